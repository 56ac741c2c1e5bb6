"""The model registry, the towers and the SLIP forward."""
from __future__ import annotations

import pytest
import timm
import torch

import slip
from slip.models import Architecture, get_architecture
from slip.models.text import TextTransformer


def test_registry_lists_every_kind_and_size():
    names = slip.list_models()
    for kind in ("clip", "simclr", "slip"):
        for size in ("s16", "b16", "l16", "tiny"):
            assert f"{kind}_vit_{size}" in names


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="slip_vit_b16"):
        slip.create_model("slip_vit_h14")


@pytest.mark.parametrize("size,timm_name,heads", [
    ("s16", "vit_small_patch16_224", 12), ("b16", "vit_base_patch16_224", 12), ("l16", "vit_large_patch16_224", 16)])
def test_image_tower_is_the_timm_vit_slip_used(size, timm_name, heads):
    with torch.device("meta"):
        ours = slip.create_model(f"slip_vit_{size}")
        ref = timm.create_model(timm_name, num_classes=0, num_heads=heads)
    assert {k: v.shape for k, v in ours.visual.state_dict().items()} == \
           {k: v.shape for k, v in ref.state_dict().items()}
    assert ours.visual.blocks[0].attn.num_heads == heads
    assert ours.visual.blocks[0].attn.fused_attn, "timm's fused attention should be on"


def test_text_tower_has_clip_dimensions():
    text = get_architecture("slip_vit_b16").text
    assert (text.width, text.heads, text.layers, text.context_length, text.vocab_size) == (512, 8, 12, 77, 49408)
    assert get_architecture("slip_vit_b16").embed_dim == 512
    ssl = get_architecture("slip_vit_b16").ssl_head
    assert (ssl.mlp_dim, ssl.out_dim) == (4096, 256)


def test_slip_initialisation_follows_clip():
    torch.manual_seed(0)
    model = slip.create_model("slip_vit_b16")
    assert model.logit_scale.item() == pytest.approx(2.6593, abs=1e-4)  # log(1 / 0.07)
    assert model.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert model.positional_embedding.std().item() == pytest.approx(0.01, rel=0.05)
    assert model.image_projection.std().item() == pytest.approx(768**-0.5, rel=0.02)
    block = model.transformer.resblocks[0]
    assert block.attn.in_proj_weight.std().item() == pytest.approx(512**-0.5, rel=0.02)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(512**-0.5 * 24**-0.5, rel=0.02)


def _tokens(n=3):
    return slip.get_tokenizer()(["a red circle", "two small blue squares on a striped background", "x"][:n])


def test_forward_returns_a_dict_with_every_branch():
    torch.manual_seed(0)
    model = slip.create_model("slip_vit_tiny")
    x = torch.randn(3, 3, 32, 32)
    out = model(image=x, text=_tokens(), views=[x, x.flip(-1)])
    assert out["image_embed"].shape == (3, 32) and out["text_embed"].shape == (3, 32)
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert [e.shape for e in out["ssl"]["embeds"]] == [(3, 32), (3, 32)]
    assert set(slip.create_model("clip_vit_tiny")(image=x, text=_tokens())) == {"image_embed", "text_embed", "logit_scale"}
    assert set(slip.create_model("simclr_vit_tiny")(views=[x, x])) == {"ssl"}


def test_wrong_branch_for_the_model_is_a_clear_error():
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(RuntimeError, match="no SSL head"):
        slip.create_model("clip_vit_tiny")(image=x, text=_tokens(2), views=[x, x])
    with pytest.raises(RuntimeError, match="text tower"):
        slip.create_model("simclr_vit_tiny")(image=x)


def test_three_views_share_one_tower_call_and_match_separate_calls():
    torch.manual_seed(0)
    model = slip.create_model("slip_vit_tiny").eval()
    calls = []
    model.visual.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))
    image, v1, v2 = (torch.randn(4, 3, 32, 32) for _ in range(3))
    with torch.no_grad():
        out = model(image=image, text=_tokens(3)[[0, 1, 2, 0]], views=[v1, v2])
        assert calls == [12], "one tower call over the concatenated views"
        assert torch.allclose(out["image_embed"], model.encode_image(image), atol=1e-5)
        for v, e in zip((v1, v2), out["ssl"]["embeds"]):
            assert torch.allclose(e, model.ssl.image_mlp(model.visual(v)), atol=1e-5)


def test_views_of_different_sizes_are_grouped_by_shape():
    model = slip.create_model("simclr_vit_tiny").eval()
    # A tower that accepts any image size (BEiT's tokenizer view is smaller than the ViT view).
    model.visual = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=0, dynamic_img_size=True).eval()
    calls = []
    model.visual.register_forward_hook(lambda m, inp, out: calls.append(tuple(inp[0].shape)))
    small, big = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.image_features([big, small, big])
    assert sorted(calls) == [(2, 3, 16, 16), (4, 3, 32, 32)]
    assert torch.allclose(feats[2], model.visual(big), atol=1e-5)


def test_ssl_head_batchnorm_sees_each_view_separately():
    # The guarantee: the tower runs once over all views, but the head is called once per view,
    # so in training mode BatchNorm normalises each view with that view's own batch statistics
    # (as SLIP does with one head call per view), and running stats are updated once per view.
    torch.manual_seed(0)
    model = slip.create_model("simclr_vit_tiny").train()
    v1, v2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32) * 3 + 1
    out = model(views=[v1, v2])
    feats = model.visual(torch.cat([v1, v2]))
    f1, f2 = feats[:8], feats[8:]
    head = model.ssl.image_mlp
    assert torch.allclose(out["ssl"]["embeds"][0], head(f1), atol=1e-5)
    assert torch.allclose(out["ssl"]["embeds"][1], head(f2), atol=1e-5)
    joint = head(feats)  # one call over both views would mix their statistics
    assert not torch.allclose(out["ssl"]["embeds"][0], joint[:8], atol=1e-3)
    assert head.bn1.num_batches_tracked.item() == 2 + 2 + 1


def test_text_features_ignore_padding_after_the_end_token():
    torch.manual_seed(0)
    model = slip.create_model("clip_vit_tiny").eval()
    tokens = _tokens(2)
    noisy = tokens.clone()
    noisy[0, 10:] = 5  # junk after "a red circle"'s EOT (position 4); EOT stays the max id
    with torch.no_grad():
        a, b = model.encode_text(tokens), model.encode_text(noisy)
    assert torch.allclose(a, b, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = slip.create_model("clip_vit_tiny")
    x, t = torch.randn(2, 3, 32, 32), _tokens(2)

    def grads():
        model.zero_grad()
        out = model(image=x, text=t)
        (out["image_embed"].sum() + out["text_embed"].square().sum()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.set_grad_checkpointing(True)
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for n in plain:
        assert torch.allclose(plain[n], checkpointed[n], atol=1e-6), n


def test_architecture_round_trips_through_a_dict_and_rejects_unknown_keys():
    arch = get_architecture("slip_vit_b16")
    assert Architecture.from_dict(arch.to_dict()) == arch
    with pytest.raises(ValueError, match="unknown architecture keys.*'depth'"):
        Architecture.from_dict({**arch.to_dict(), "depth": 3})


def test_text_attention_uses_fused_causal_sdpa(monkeypatch):
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((kwargs.get("is_causal"), kwargs.get("attn_mask")))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    TextTransformer(16, 2, 2)(torch.randn(2, 5, 16))
    assert seen == [(True, None), (True, None)]
