"""The tokenizer is open_clip's CLIP BPE with ftfy/regex cleaning and 77 tokens."""
from __future__ import annotations

import open_clip
import torch
import pytest

import slip
from slip.tokenizer import EOT_TOKEN, SOT_TOKEN, get_tokenizer, trim_padding


def test_shape_start_end_and_padding():
    tokens = slip.get_tokenizer()(["a photo of a dog", "cat"])
    assert tokens.shape == (2, 77) and tokens.dtype.is_signed
    assert tokens[0, 0] == SOT_TOKEN and tokens[0].argmax() == 6 and tokens[0, 6] == EOT_TOKEN
    assert (tokens[0, 7:] == 0).all()


def test_matches_open_clip_reference_tokenizer():
    texts = ["A Photo of a DOG!", "naïve café — déjà vu", "  many   spaces\n\tand tabs "]
    assert slip.get_tokenizer()(texts).equal(open_clip.get_tokenizer("ViT-B-16")(texts))


def test_cleaning_fixes_mojibake_html_entities_and_whitespace():
    tok = slip.get_tokenizer()
    assert tok(["cafÃ©"]).equal(tok(["café"]))  # ftfy repairs UTF-8 read as Latin-1
    assert tok(["salt &amp; pepper"]).equal(tok(["salt & pepper"]))
    assert tok(["a   red \n circle"]).equal(tok(["a red circle"]))
    assert tok(["A RED Circle"]).equal(tok(["a red circle"]))


def test_long_text_is_truncated_with_the_end_token_kept_last():
    tokens = slip.get_tokenizer()(["word " * 200])
    assert tokens.shape == (1, 77)
    assert tokens[0, -1] == EOT_TOKEN and tokens[0].argmax() == 76


def test_slip_truncation_keeps_the_first_77_tokens_and_drops_eot():
    text = "a dog on a beach at sunset " * 20
    bpe = open_clip.tokenizer.SimpleTokenizer().encode(text)
    assert len(bpe) > 76
    tokens = slip.get_tokenizer(truncation="slip")([text])
    assert tokens[0].tolist() == ([SOT_TOKEN] + bpe)[:77]  # exactly the first 77 of [SOT] + BPE + [EOT]
    assert EOT_TOKEN not in tokens[0].tolist()
    assert slip.get_tokenizer(truncation="keep_eot")([text]).equal(open_clip.get_tokenizer("ViT-B-16")([text]))


@pytest.mark.parametrize("words,same", [(75, True), (76, False)])
def test_truncations_differ_only_past_75_bpe_tokens(words, same):
    # "word" is one BPE token: SOT + 75 + EOT fills the 77 positions exactly.
    texts = ["word " * words, "a short caption"]
    slip_tokens = slip.get_tokenizer(truncation="slip")(texts)
    kept = slip.get_tokenizer(truncation="keep_eot")(texts)
    assert slip_tokens.shape == kept.shape == (2, 77)
    assert slip_tokens[1].equal(kept[1])
    assert slip_tokens[0].equal(kept[0]) == same
    assert kept[0, 76] == EOT_TOKEN and (slip_tokens[0, 76] == EOT_TOKEN) == same


def test_unknown_truncation_is_refused():
    with pytest.raises(ValueError, match="truncation must be one of keep_eot, slip"):
        slip.get_tokenizer(truncation="drop")


def test_trimmed_padding_changes_no_text_feature():
    import slip

    torch.manual_seed(0)
    model = slip.create_model("clip_vit_tiny").eval()
    tokens = get_tokenizer()(["a cat", "a photo of a small dog on a red sofa", "x"])
    trimmed = trim_padding(tokens)
    assert trimmed.shape == (3, 16) and torch.equal(trimmed, tokens[:, :16])  # last EOT at position 11
    assert torch.equal(trim_padding(tokens, multiple=1), tokens[:, :12])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(trimmed), model.encode_text(tokens), atol=2e-6, rtol=0)
    long = get_tokenizer()(["word " * 200])
    assert trim_padding(long).shape == (1, 77)  # never longer than the context


def test_text_tower_never_reads_token_values_on_the_host():
    # On the meta device a tensor has a shape but no values: code that reads one (int(),
    # .item(), a data-dependent shape) fails here, as it would stall a GPU step on the host.
    import slip

    model = slip.create_model("clip_vit_tiny").to("meta")
    out = model.encode_text(torch.zeros(4, 24, dtype=torch.long, device="meta"))
    assert out.shape == (4, model.arch.embed_dim) and out.device.type == "meta"
