"""Loading released SLIP checkpoints and the project's own, safely and exactly."""
from __future__ import annotations

import argparse
import os
import re

import pytest
import timm
import torch

import slip
from slip.checkpoint import CheckpointError, read_checkpoint
from slip.models import get_architecture

from original_slip import OriginalCLIP

SIZES = {"s": ("vit_small_patch16_224", 12), "b": ("vit_base_patch16_224", 12), "l": ("vit_large_patch16_224", 16)}
TEXT_LAYERS, TEXT_WIDTH, CONTEXT, VOCAB = 12, 512, 77, 49408


def released_layout_shapes(kind: str, size: str) -> dict[str, tuple]:
    """Key -> shape of a released checkpoint, written out from SLIP's description, not slip's code."""
    timm_name, heads = SIZES[size]
    with torch.device("meta"):
        visual = timm.create_model(timm_name, num_classes=0, num_heads=heads)
    shapes = {f"visual.{k}": tuple(v.shape) for k, v in visual.state_dict().items()}
    width = visual.embed_dim
    if kind in ("clip", "slip"):
        w = TEXT_WIDTH
        for i in range(TEXT_LAYERS):
            p = f"transformer.resblocks.{i}."
            shapes.update({
                p + "attn.in_proj_weight": (3 * w, w), p + "attn.in_proj_bias": (3 * w,),
                p + "attn.out_proj.weight": (w, w), p + "attn.out_proj.bias": (w,),
                p + "ln_1.weight": (w,), p + "ln_1.bias": (w,),
                p + "mlp.c_fc.weight": (4 * w, w), p + "mlp.c_fc.bias": (4 * w,),
                p + "mlp.c_proj.weight": (w, 4 * w), p + "mlp.c_proj.bias": (w,),
                p + "ln_2.weight": (w,), p + "ln_2.bias": (w,),
            })
        shapes.update({
            "token_embedding.weight": (VOCAB, w), "positional_embedding": (CONTEXT, w),
            "ln_final.weight": (w,), "ln_final.bias": (w,),
            "image_projection": (width, 512), "text_projection": (w, 512), "logit_scale": (),
        })
    if kind in ("simclr", "slip"):
        for name, shape in [("layer1", (4096, width)), ("layer2", (4096, 4096)), ("layer3", (256, 4096))]:
            shapes[f"image_mlp.{name}.weight"] = shape
            shapes[f"image_mlp.{name}.bias"] = shape[:1]
        for bn in ("bn1", "bn2"):
            for stat in ("weight", "bias", "running_mean", "running_var"):
                shapes[f"image_mlp.{bn}.{stat}"] = (4096,)
            shapes[f"image_mlp.{bn}.num_batches_tracked"] = ()
    return shapes


def save_released(path, state_dict: dict, model_name: str) -> None:
    args = argparse.Namespace(model=model_name, ssl_mlp_dim=4096, ssl_emb_dim=256, ssl_scale=1.0,
                              ssl_temp=0.1, lr=3e-3, epochs=25, output_dir="/checkpoint/slip")
    torch.save({"epoch": 25, "args": args,
                "state_dict": {f"module.{k}": v for k, v in state_dict.items()}}, path)


@pytest.mark.parametrize("size", ["s", "b", "l"])
@pytest.mark.parametrize("kind", ["clip", "simclr", "slip"])
def test_released_layout_loads_with_every_key_matched(tmp_path, kind, size):
    # Constant tensors expanded to full shape: torch.save stores one number per tensor, so even
    # ViT-L files are tiny, while each key still carries a value that identifies it.
    shapes = released_layout_shapes(kind, size)
    state_dict = {}
    for i, (key, shape) in enumerate(sorted(shapes.items())):
        dtype = torch.long if key.endswith("num_batches_tracked") else torch.float32
        state_dict[key] = torch.full((), i, dtype=dtype).expand(shape)
    path = tmp_path / f"{kind}_{size}.pt"
    save_released(path, state_dict, f"{kind.upper()}_VIT{size.upper()}16")
    assert os.path.getsize(path) < 2_000_000

    model, preprocess = slip.load_pretrained(path)  # strict: raises on missing or unexpected keys
    assert model.arch == get_architecture(f"{kind}_vit_{size}16")
    loaded = model.state_dict()
    ours = {("ssl." + k if k.startswith("image_mlp.") else k): k for k in shapes}  # SLIP's head lives in model.ssl
    assert set(loaded) == set(ours)
    index = {key: i for i, key in enumerate(sorted(shapes))}
    for key, released_key in ours.items():
        assert tuple(loaded[key].shape) == shapes[released_key], key
        assert torch.all(loaded[key] == index[released_key]), key
    assert not model.training
    assert preprocess.transforms[1].size == (224, 224)


def test_released_slip_gives_the_original_embeddings(tmp_path):
    torch.manual_seed(0)
    original = OriginalCLIP("vit_small_patch16_224", vision_heads=12, ssl=(4096, 256)).eval()
    save_released(tmp_path / "slip_small_25ep.pt", original.state_dict(), "SLIP_VITS16")

    model, _ = slip.load_pretrained(tmp_path / "slip_small_25ep.pt")
    images = torch.randn(2, 3, 224, 224)
    tokenizer = slip.get_tokenizer()
    text = tokenizer(["a photo of a dog", "an extremely long caption " * 20])
    with torch.no_grad():
        assert torch.allclose(model.encode_image(images), original.encode_image(images), atol=1e-5, rtol=1e-5)
        ours, ref = model.encode_text(text), original.encode_text(text)
        assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-4), (ours - ref).abs().max()
        feats = torch.randn(8, 384)
        assert torch.allclose(model.ssl.image_mlp(feats), original.image_mlp(feats), atol=1e-5)


def test_state_dict_not_matching_its_declared_model_is_refused(tmp_path):
    shapes = released_layout_shapes("clip", "s")
    save_released(tmp_path / "x.pt", {k: torch.zeros(()).expand(s) for k, s in shapes.items()}, "CLIP_VITB16")
    with pytest.raises(CheckpointError, match=r"x\.pt.*do not match args.model='CLIP_VITB16'"):
        slip.load_pretrained(tmp_path / "x.pt")


def test_unknown_released_model_name_lists_the_known_ones(tmp_path):
    shapes = released_layout_shapes("clip", "s")
    save_released(tmp_path / "x.pt", {k: torch.zeros(()).expand(s) for k, s in shapes.items()}, "CLIP_VITH14")
    with pytest.raises(CheckpointError, match=r"CLIP_VITH14.*SLIP_VITB16"):
        slip.load_pretrained(tmp_path / "x.pt")


class _Payload:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_without_running_its_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"epoch": 1, "args": _Payload(str(marker)), "state_dict": {}}, path)
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*refused"):
        slip.load_pretrained(path)
    assert not marker.exists()


def test_truncated_or_garbage_file_gives_an_error_naming_it(tmp_path):
    model = slip.create_model("clip_vit_tiny")
    good = tmp_path / "good.pt"
    slip.save_checkpoint(model, good)
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        slip.load_pretrained(bad)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pt: not a PyTorch checkpoint"):
        slip.load_pretrained(junk)
    with pytest.raises(CheckpointError, match="missing.pt"):
        slip.load_pretrained(tmp_path / "missing.pt")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("name", ["clip_vit_tiny", "simclr_vit_tiny", "slip_vit_tiny"])
def test_own_checkpoint_round_trip_gives_identical_embeddings(tmp_path, name, suffix):
    torch.manual_seed(0)
    model = slip.create_model(name).eval()
    path = tmp_path / f"model{suffix}"
    slip.save_checkpoint(model, path, step=7)
    loaded, preprocess = slip.load_pretrained(path)
    assert loaded.arch == model.arch
    image = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(image), model.encode_image(image))
        if model.has_text:
            text = slip.get_tokenizer()(["a", "b c", "d e f"])
            assert torch.equal(loaded.encode_text(text), model.encode_text(text))
    assert read_checkpoint(path).meta["step"] == 7
    assert preprocess.transforms[1].size == (32, 32)
    assert not list(tmp_path.glob(".*tmp")), "temporary files left behind"


def test_own_torch_checkpoint_opens_in_plain_weights_only_load(tmp_path):
    slip.save_checkpoint(slip.create_model("slip_vit_tiny"), tmp_path / "m.pt", epoch=3)
    obj = torch.load(tmp_path / "m.pt", weights_only=True)
    assert obj["format"] == "slip/1" and obj["epoch"] == 3 and "visual.cls_token" in obj["state_dict"]


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    slip.save_checkpoint(slip.create_model("clip_vit_tiny"), path, step=1)
    before = path.read_bytes()

    def crash(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        slip.save_checkpoint(slip.create_model("clip_vit_tiny"), path, step=2)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads Linux's /proc")
def test_a_torch_save_checkpoint_is_read_memory_mapped(tmp_path):
    # The ranks of a resumed run share the file's pages instead of each reading a copy: loading
    # does not make the tensors resident, touching them does.
    from slip.checkpoint import _torch_load

    path = tmp_path / "big.pt"
    torch.save({"bank": torch.ones(16 * 2**20)}, path)  # 64 MiB
    before = _resident_bytes()
    bank = _torch_load(path)["bank"]
    loaded = _resident_bytes()
    assert float(bank.sum()) == 16 * 2**20
    touched = _resident_bytes()
    assert loaded - before < 16 * 2**20 and touched - before > 48 * 2**20, (before, loaded, touched)
    bank.add_(1)  # a private mapping: writing copies the pages, the file stays as saved
    assert float(_torch_load(path)["bank"].sum()) == 16 * 2**20
