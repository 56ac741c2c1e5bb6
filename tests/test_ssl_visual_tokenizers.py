"""Tests of slip.ssl.visual_tokenizers and the ``slip fit-tokenizer`` command."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from slip.ssl import fit_tokenizer
from slip.ssl.visual_tokenizers import (
    FlavaCodebookTokenizer,
    KMeansPatchTokenizer,
    extract_patches,
    kmeans,
    load_visual_tokenizer,
    nearest_centroid,
)

COLOURS = torch.tensor([[230, 20, 20], [20, 200, 40], [30, 40, 220], [240, 240, 240]], dtype=torch.uint8)


def colour_patch_images(n: int, seed: int, side: int = 16, patch: int = 8, noise: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Images tiled with solid-colour ``patch`` squares (plus pixel noise) and each patch's colour id.

    Returns ``(images (n, 3, side, side) uint8, colour ids (n, (side/patch)^2))``.
    """
    g = torch.Generator().manual_seed(seed)
    cells = side // patch
    ids = torch.randint(len(COLOURS), (n, cells, cells), generator=g)
    img = COLOURS[ids].permute(0, 3, 1, 2).float()  # (n, 3, cells, cells)
    img = img.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)
    img = img + torch.randint(-noise, noise + 1, img.shape, generator=g).float()
    return img.clamp(0, 255).to(torch.uint8), ids.reshape(n, -1)


# ------------------------------------------------------------------------------------------
# FLAVA codebook
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flava_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    from transformers import FlavaImageCodebook, FlavaImageCodebookConfig

    torch.manual_seed(0)
    # hidden_size 8 instead of 256 keeps CPU time small; vocabulary and downsampling are the real ones.
    model = FlavaImageCodebook(FlavaImageCodebookConfig(hidden_size=8, vocab_size=8192)).eval()
    with torch.no_grad():
        # Random init gives near-constant logits (every patch the same code); spread them so the
        # comparison below can tell positions and images apart.
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.normal_(0.0, 0.5)
                module.bias.normal_(0.0, 0.1)
    path = tmp_path_factory.mktemp("flava") / "codebook"
    model.save_pretrained(path)
    return path, model


def test_flava_codebook_roundtrip(flava_dir: tuple[Path, torch.nn.Module]) -> None:
    path, reference = flava_dir
    tok = FlavaCodebookTokenizer.from_directory(path)
    assert (tok.vocab_size, tok.input_size, tok.grid, tok.num_tokens) == (8192, 112, (14, 14), 196)
    assert "0.1" in tok.expected_normalization
    assert all(not p.requires_grad for p in tok.parameters())
    tok.train()
    assert not tok.training and not tok.codebook.training
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 112, 112), dtype=torch.uint8, generator=g)
    ids = tok(images)
    assert ids.shape == (2, 196) and ids.dtype == torch.int64
    assert int(ids.min()) >= 0 and int(ids.max()) < 8192
    assert torch.equal(ids, tok(images))  # deterministic
    assert torch.equal(ids, tok(images.float() / 255))  # uint8 and [0, 1] float agree
    # Same as calling the saved model on DALL-E's logit-Laplace mapping, in raster order.
    with torch.no_grad():
        expected = reference.get_codebook_indices(0.8 * (images.float() / 255) + 0.1).flatten(1)
    assert torch.equal(ids, expected)
    assert ids.unique().numel() > 10
    with pytest.raises(ValueError, match="112"):
        tok(torch.zeros(1, 3, 224, 224))
    # Other sides divisible by 8 work and give the matching grid; a directory means FLAVA.
    other = load_visual_tokenizer(path, input_size=64)
    assert isinstance(other, FlavaCodebookTokenizer) and other.grid == (8, 8)
    with pytest.raises(ValueError, match="divisible"):
        FlavaCodebookTokenizer.from_directory(path, input_size=100)


def test_flava_codebook_bad_directories(tmp_path: Path, flava_dir: tuple[Path, torch.nn.Module]) -> None:
    path, _ = flava_dir
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        FlavaCodebookTokenizer.from_directory(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        FlavaCodebookTokenizer.from_directory(empty)
    config = json.loads((path / "config.json").read_text())
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="no weights"):
        FlavaCodebookTokenizer.from_directory(no_weights)
    wrong_type = tmp_path / "wrong_type"
    wrong_type.mkdir()
    (wrong_type / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (wrong_type / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="wrong_type"):
        FlavaCodebookTokenizer.from_directory(wrong_type)
    # Weights of something else: loading must fail loudly, not leave random codebook weights.
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps(config))
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(foreign / "model.safetensors"))
    with pytest.raises(ValueError, match="foreign"):
        FlavaCodebookTokenizer.from_directory(foreign)


# ------------------------------------------------------------------------------------------
# k-means patch codebook
# ------------------------------------------------------------------------------------------
def test_extract_patches_layout() -> None:
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4) / 100
    patches = extract_patches(images, 2)
    assert patches.shape == (2, 4, 12)
    # Patch 1 of image 0 is the top-right 2 x 2 square, flattened (C, p, p).
    assert torch.equal(patches[0, 1], images[0, :, 0:2, 2:4].reshape(-1))
    assert torch.equal(patches[1, 2], images[1, :, 2:4, 0:2].reshape(-1))
    std = extract_patches(images, 2, "standardize")
    assert torch.allclose(std.mean(-1), torch.zeros(2, 4), atol=1e-5)
    with pytest.raises(ValueError):
        extract_patches(images, 3)


def test_nearest_centroid_matches_cdist() -> None:
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(300, 12, generator=g), torch.randn(7, 12, generator=g)
    index, dist = nearest_centroid(x, c, chunk_rows=64)
    full = torch.cdist(x, c) ** 2
    assert torch.equal(index, full.argmin(1))
    assert torch.allclose(dist, full.min(1).values, atol=1e-4)


def test_kmeans_recovers_solid_colours() -> None:
    images, colour_ids = colour_patch_images(40, seed=0)
    tok = KMeansPatchTokenizer.fit(images, k=4, patch_size=8, iters=10, seed=0)
    assert (tok.vocab_size, tok.grid, tok.input_size) == (4, (2, 2), 16)
    assert not any(p.requires_grad for p in tok.parameters())
    fresh, fresh_ids = colour_patch_images(30, seed=1)
    tokens = tok(fresh)
    assert tokens.shape == (30, 4)
    # Each colour maps to exactly one code, and the four colours to four different codes.
    codes = {}
    for colour in range(4):
        used = tokens[fresh_ids == colour].unique()
        assert used.numel() == 1
        codes[colour] = int(used)
    assert len(set(codes.values())) == 4
    result = tok.fit_result
    assert result is not None and result.converged and int(result.counts.min()) > 0
    # Centroids sit on the colours (noise averages out).
    centre_colours = tok.centroids.reshape(4, 3, 64).mean(-1) * 255
    for colour, code in codes.items():
        assert torch.allclose(centre_colours[code], COLOURS[colour].float(), atol=3.0)


def test_kmeans_inertia_decreases() -> None:
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(6, 8, generator=g) * 2
    x = centres[torch.randint(6, (600,), generator=g)] + torch.randn(600, 8, generator=g)
    seen: list[tuple[int, float]] = []
    result = kmeans(x, 10, iters=15, seed=0, init="random", callback=lambda i, v: seen.append((i, v)))
    history = result.inertia
    assert len(history) == result.iterations + 1 and [i for i, _ in seen] == list(range(len(history)))
    assert all(b <= a * (1 + 1e-6) for a, b in zip(history, history[1:]))
    assert history[-1] < 0.95 * history[0]
    # Reported inertia is the inertia of the returned centroids.
    _, dist = nearest_centroid(x, result.centroids)
    assert dist.sum().item() == pytest.approx(history[-1], rel=1e-5)
    # Same seed, same result.
    again = kmeans(x, 10, iters=15, seed=0, init="random")
    assert torch.equal(again.centroids, result.centroids)


def test_kmeans_reseeds_empty_clusters() -> None:
    images, _ = colour_patch_images(20, seed=2)
    patches = extract_patches(images, 8).reshape(-1, 192)
    # Three centroids on colours 0-2 (colour 3 joins one of them) and one far from every patch:
    # that cluster starts empty and must be moved onto data to recover the fourth colour.
    init = torch.cat([COLOURS[:3].float().div(255).repeat_interleave(64, dim=1), torch.full((1, 192), 10.0)])
    result = kmeans(patches, 4, iters=10, init=init)
    assert result.reseeded >= 1
    assert int(result.counts.min()) > 0
    index, dist = nearest_centroid(patches, result.centroids)
    assert index.unique().numel() == 4 and float(dist.max()) < 192 * (20 / 255) ** 2


def test_kmeans_save_load_roundtrip(tmp_path: Path) -> None:
    images, _ = colour_patch_images(20, seed=4)
    tok = KMeansPatchTokenizer.fit(images, k=6, patch_size=4, iters=5, seed=1, patch_norm="standardize")
    out = tmp_path / "sub" / "codebook.safetensors"
    tok.save(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["codebook.safetensors"]  # no temp files left
    loaded = KMeansPatchTokenizer.load(out)
    assert (loaded.patch_size, loaded.input_size, loaded.patch_norm, loaded.eps) == (4, 16, "standardize", tok.eps)
    assert torch.equal(loaded.centroids, tok.centroids)
    test_images, _ = colour_patch_images(8, seed=5)
    assert torch.equal(loaded(test_images), tok(test_images))
    assert torch.equal(loaded.state_dict()["centroids"], tok.centroids)
    assert isinstance(load_visual_tokenizer(out, input_size=16), KMeansPatchTokenizer)
    with pytest.raises(ValueError, match="16 px"):
        load_visual_tokenizer(out, input_size=32)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors"):
        KMeansPatchTokenizer.load(bad)
    with pytest.raises(FileNotFoundError):
        KMeansPatchTokenizer.load(tmp_path / "absent.safetensors")


# ------------------------------------------------------------------------------------------
# slip fit-tokenizer
# ------------------------------------------------------------------------------------------
def _jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def test_fit_tokenizer_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import webdataset as wds

    rng = np.random.default_rng(0)
    shards = tmp_path / "shards"
    shards.mkdir()
    for shard in range(2):
        with wds.TarWriter(str(shards / f"{shard:05d}.tar")) as sink:
            for i in range(5):
                # 32 x 32 images of four solid 16 x 16 quadrants: at 16 px the 8 px patches are the
                # quadrants, so the four colours are the natural codes.
                quadrants = COLOURS[torch.from_numpy(rng.integers(0, 4, (2, 2)))].numpy()
                array = quadrants.repeat(16, axis=0).repeat(16, axis=1)
                sink.write({"__key__": f"s{shard}_{i}", "jpg": _jpeg(array), "txt": "a picture"})
            sink.write({"__key__": f"s{shard}_bad", "jpg": b"\xff\xd8 not really a jpeg", "txt": "broken"})
    out = tmp_path / "codebook.safetensors"
    rc = fit_tokenizer.main([str(shards), str(out), "--k", "4", "--patch", "8", "--input-size", "16",
                             "--samples", "100", "--iters", "10", "--seed", "0", "--patches-per-image", "0",
                             "--no-progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["images"] == 10 and summary["patches"] == 40 and summary["k"] == 4
    assert sum(summary["skipped"].values()) == 2
    assert summary["codes_used"] == 4 and summary["inertia"] <= summary["inertia_initial"]
    tok = KMeansPatchTokenizer.load(out)
    assert (tok.vocab_size, tok.patch_size, tok.input_size) == (4, 8, 16)
    images, ids = colour_patch_images(12, seed=7, noise=2)
    tokens = tok(images)
    assert all(tokens[ids == c].unique().numel() == 1 for c in range(4))
    assert tokens.unique().numel() == 4

    # --samples limits the read; a spec that matches nothing is a clean error.
    capsys.readouterr()
    assert fit_tokenizer.main([str(shards), str(out), "--k", "4", "--input-size", "16", "--samples", "3", "--min-scale", "0.5",
                               "--patches-per-image", "0", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 3
    assert fit_tokenizer.main([str(tmp_path / "missing-{0..3}.tar"), str(out), "--no-progress"]) == 2
    assert fit_tokenizer.main([str(shards), str(out), "--input-size", "15", "--patch", "8"]) == 2
