"""BEiT as an SSL branch: the tower's patch mask, the masked-modelling loss, the tokenizer kept
out of the model's state, and the model with a CLIP view and a masked view in one tower call."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import slip
from slip.models import get_architecture
from slip.ssl.visual_tokenizers import KMeansPatchTokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 16


def beit_model(name: str = "slip_vit_tiny", vocab: int = VOCAB, seed: int = 0) -> slip.SLIPModel:
    arch = get_architecture(name)
    arch = arch.with_ssl_method("beit", vocab)
    torch.manual_seed(seed)
    return slip.create_model(arch).eval()


def random_tokenizer(vocab: int = VOCAB, patch: int = 4, input_size: int = 16, seed: int = 0) -> KMeansPatchTokenizer:
    # The tiny tower has 4 x 4 patches of 8 px; 16 px tokenizer crops with 4 px patches match it.
    g = torch.Generator().manual_seed(seed)
    return KMeansPatchTokenizer(torch.rand(vocab, 3 * patch * patch, generator=g), patch, input_size)


def block_mask(n: int, patches: list[int], total: int = 16) -> torch.Tensor:
    mask = torch.zeros(n, total, dtype=torch.bool)
    mask[:, patches] = True
    return mask


def test_pixels_under_masked_patches_do_not_reach_the_tower():
    model = beit_model()
    x = torch.randn(2, 3, 32, 32)
    mask = block_mask(2, [0, 1, 4, 5])  # the top-left 16 x 16 pixels (patches of 8 px, 4 per row)
    tokens = model.image_features([x], [mask])[0]
    assert tokens.shape == (2, 16, 64)
    hidden = x.clone()
    hidden[:, :, :16, :16] = torch.randn(2, 3, 16, 16)
    assert torch.allclose(model.image_features([hidden], [mask])[0], tokens, atol=1e-6)
    visible = x.clone()
    visible[:, :, 24:, 24:] += 1.0  # the bottom-right patch is not masked
    assert not torch.allclose(model.image_features([visible], [mask])[0], tokens, atol=1e-3)


def test_masked_tokens_are_the_mask_token_before_the_position_embedding():
    model = beit_model()
    emb = torch.randn(2, 16, 64)
    mask = block_mask(2, [3, 7])
    out = model.ssl.mask_patches(emb, mask)
    assert torch.equal(out[:, [3, 7]], model.ssl.mask_token.expand(2, 2, 64))
    keep = ~mask[0]
    assert torch.equal(out[:, keep], emb[:, keep])


def test_clip_view_and_masked_view_go_through_one_tower_call_with_the_same_results():
    model = beit_model()
    image, view = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)
    mask = block_mask(3, [5, 6, 9, 10])
    calls = []
    hook = model.visual.patch_embed.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    pooled, tokens = model.image_features([image, view], [None, mask])
    hook.remove()
    assert calls == [6], "one tower call over both batches"
    assert torch.allclose(pooled, model.visual(image), atol=1e-5)
    assert torch.allclose(tokens, model.image_features([view], [mask])[0], atol=1e-5)


def test_an_empty_mask_gives_the_plain_tower_features():
    model = beit_model()
    x = torch.randn(2, 3, 32, 32)
    tokens = model._masked_tower(x, torch.zeros(2, 16, dtype=torch.bool))
    assert torch.allclose(model.visual.forward_head(tokens), model.visual(x), atol=1e-6)
    assert torch.allclose(tokens, model.visual.forward_features(x), atol=1e-6)


def test_loss_is_cross_entropy_over_the_masked_positions_only():
    model = beit_model("simclr_vit_tiny")
    tokens = torch.randn(2, 16, 64)
    codes = torch.randint(VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = block_mask(2, [0, 1, 2])
    out = model.ssl([tokens], [codes], mask)
    logits = model.ssl.lm_head(tokens[:, :3].reshape(6, 64))
    expected = F.cross_entropy(logits, codes[:, :3].reshape(6))
    loss = model.ssl.loss(out)
    assert loss["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss["ssl_acc"].item() == pytest.approx(
        (logits.argmax(-1) == codes[:, :3].reshape(6)).float().mean().item() * 100)
    other = codes.clone()
    other[:, 3:] = (other[:, 3:] + 1) % VOCAB  # codes of visible patches do not matter
    assert model.ssl.loss(model.ssl([tokens], [other], mask))["loss"].item() == pytest.approx(loss["loss"].item())
    # A head that predicts every code exactly gives a loss near 0 and 100% accuracy.
    perfect = {"logits": F.one_hot(codes[mask], VOCAB).float() * 50, "labels": codes[mask]}
    assert model.ssl.loss(perfect)["loss"].item() < 1e-6 and model.ssl.loss(perfect)["ssl_acc"].item() == 100


def test_targets_are_the_tokenizer_codes_of_the_second_view():
    model = beit_model()
    tokenizer = random_tokenizer()
    model.ssl.attach_visual_tokenizer(tokenizer)
    view, small = torch.randn(2, 3, 32, 32), torch.rand(2, 3, 16, 16)
    mask = block_mask(2, [0, 5, 10])
    feats = model.forward_features(views=[view, small], patch_mask=mask)
    assert torch.equal(feats["ssl_targets"][0], tokenizer(small))
    assert len(feats["views"]) == 1 and feats["views"][0].shape == (2, 16, 64)
    out = model.forward_heads(feats)["ssl"]
    assert out["logits"].shape == (6, VOCAB) and torch.equal(out["labels"], tokenizer(small)[mask])
    with pytest.raises(ValueError, match="needs a patch_mask"):
        model.forward_features(views=[view, small])
    with pytest.raises(ValueError, match="takes 2 views, got 1"):
        model.forward_features(views=[view], patch_mask=mask)


def test_tokenizer_stays_out_of_the_state_dict_and_the_checkpoint_round_trips(tmp_path):
    model = beit_model()
    model.ssl.attach_visual_tokenizer(random_tokenizer())
    keys = set(model.state_dict())
    assert {"ssl.mask_token", "ssl.lm_head.weight", "ssl.lm_head.bias"} <= keys
    assert not any("centroids" in k or "tokenizer" in k for k in keys)
    assert all(p is not model.ssl.visual_tokenizer.centroids for p in model.buffers())
    slip.save_checkpoint(model, tmp_path / "beit.pt")
    loaded, _ = slip.load_pretrained(tmp_path / "beit.pt")
    assert loaded.arch.ssl_head.method == "beit" and loaded.arch.ssl_head.vocab_size == VOCAB
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with pytest.raises(RuntimeError, match="attach_visual_tokenizer"):
        loaded.ssl.visual_tokenizer


def test_a_tokenizer_of_another_vocabulary_or_grid_is_refused():
    model = beit_model()
    with pytest.raises(ValueError, match=r"32 codes but the BEiT head predicts 16"):
        model.ssl.attach_visual_tokenizer(random_tokenizer(vocab=32))
    with pytest.raises(ValueError, match=r"8x8 grid of codes but the image tower has 4x4 patches"):
        model.ssl.attach_visual_tokenizer(random_tokenizer(patch=2))


def test_data_views_are_one_crop_at_two_sizes_and_a_blockwise_mask():
    model = beit_model()
    model.ssl.attach_visual_tokenizer(random_tokenizer())
    views = model.ssl.data_views(32, mask_ratio=0.4)
    big, small = views.ssl
    assert (big.size, small.size) == ((32, 32), (16, 16))
    assert small.shares == big.name and not small.normalize and big.normalize
    masks = views.mask.sample_masks(200, 0)
    assert masks.shape == (200, 16) and (masks.sum(1) == math.floor(0.4 * 16)).all()
    b16 = beit_model("simclr_vit_b16", vocab=8192)
    gen = b16.ssl.data_views  # without a tokenizer the 112 px view size is unknown
    with pytest.raises(RuntimeError, match="objective.tokenizer"):
        gen(224)


def test_the_masked_view_trains_the_tower_and_the_mask_token():
    model = beit_model("simclr_vit_tiny").train()
    model.ssl.attach_visual_tokenizer(random_tokenizer())
    g = torch.Generator().manual_seed(1)
    out = model(views=[torch.randn(4, 3, 32, 32, generator=g), torch.rand(4, 3, 16, 16, generator=g)],
                patch_mask=block_mask(4, [1, 2, 6]))
    model.ssl.loss(out["ssl"])["loss"].backward()
    assert model.ssl.mask_token.grad.abs().sum() > 0
    assert model.visual.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.visual.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
