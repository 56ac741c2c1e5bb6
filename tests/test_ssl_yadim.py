"""YADIM: the loss against hand-computed values, its views as the union of AMDIM's and CPC's
augmentations, the last map's positions as representation without a head, and training through
the trainer (learning, beside CLIP, exact resume)."""
from __future__ import annotations

import math

import pytest
import torch
from test_ssl import (  # noqa: F401  (corpus: the shared fixture)
    _run,
    check_exact_resume,
    check_lowers_its_loss,
    check_trains_beside_clip,
    corpus,
)

import slip
from slip.data import views as V
from slip.models import get_architecture
from slip.ssl.amdim import amdim_views
from slip.ssl.yadim import union_view, yadim_nce, yadim_views


def _by_hand(m1, m2, idx1, idx2, t):
    """Bolts' FeatureMapContrastiveTask on the last maps with plain Python loops: the drawn
    position idx[i] of image i of one view against every position of the other view, AMDIM's NCE
    (scores / sqrt(C) / t, clip 10, penalty 5e-2 mean(s^2)), both directions averaged."""
    b, positions, c = m1.shape

    def direction(a, idx, k):
        raw = [[[sum(a[i, idx[i], d].item() * k[j, p, d].item() for d in range(c)) / math.sqrt(c) / t
                 for p in range(positions)] for j in range(b)] for i in range(b)]
        reg = 5e-2 * sum(s * s for row in raw for col in row for s in col) / (b * b * positions)
        clipped = [[[10 * math.tanh(s / 10) for s in col] for col in row] for row in raw]
        total = 0.0
        for i in range(b):
            negatives = [s for j in range(b) if j != i for s in clipped[i][j]]
            for p in range(positions):
                pos = clipped[i][i][p]
                total += -(pos - math.log(math.exp(pos) + sum(math.exp(s) for s in negatives)))
        return total / (b * positions) + reg

    return (direction(m1, idx1, m2) + direction(m2, idx2, m1)) / 2


def test_nce_matches_a_hand_computed_value():
    gen = torch.Generator().manual_seed(2)
    m1, m2 = torch.randn(4, 3, 5, generator=gen) * 4, torch.randn(4, 3, 5, generator=gen) * 4
    for t in (1.0, 0.3):
        draws = torch.Generator().manual_seed(11)
        idx1, idx2 = torch.randint(3, (4,), generator=draws).tolist(), torch.randint(3, (4,), generator=draws).tolist()
        out = yadim_nce(m1, m2, t, generator=torch.Generator().manual_seed(11))
        assert out["loss"].item() == pytest.approx(_by_hand(m1, m2, idx1, idx2, t), rel=1e-6)
        assert out["loss"].item() == pytest.approx(out["nce"].item() + out["reg"].item(), rel=1e-6)


def test_bfloat16_maps_are_divided_by_the_temperature_in_float32():
    # Under bf16 autocast the maps arrive in bfloat16: the loss is the float32 one of the same
    # (rounded) maps, the division by tau included.
    gen = torch.Generator().manual_seed(3)
    m1, m2 = (torch.randn(4, 3, 5, generator=gen).mul(4).bfloat16() for _ in range(2))
    low = yadim_nce(m1, m2, 0.3, generator=torch.Generator().manual_seed(11))
    high = yadim_nce(m1.float(), m2.float(), 0.3, generator=torch.Generator().manual_seed(11))
    assert low["loss"].dtype == torch.float32 and low["loss"].item() == pytest.approx(high["loss"].item(), rel=1e-6)


def test_views_are_the_union_of_amdims_and_cpcs_augmentations():
    # Bolts' AMDIM and CPC ImageNet transforms are one pipeline, so the union is AMDIM's view.
    for view in yadim_views(224):
        assert (view.scale, view.ratio, view.jitter, view.jitter_p, view.grayscale_p, view.hflip_p, view.blur_p) == (
            (0.3, 1.0), (0.7, 1.4), (0.4, 0.4, 0.4, 0.1), 0.8, 0.25, 0.5, 0.0)
    cpc = V.cpc_views(224)[0]
    for view, amdim in zip(yadim_views(224), amdim_views(224)):
        assert view.size == amdim.size and view.tile_of is None
        for src in (amdim, cpc):  # every range covers both, every probability at least either's
            assert view.scale[0] <= src.scale[0] and view.scale[1] >= src.scale[1]
            assert view.ratio[0] <= src.ratio[0] and view.ratio[1] >= src.ratio[1]
            for f in ("hflip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
                assert getattr(view, f) >= getattr(src, f), f
            assert all(x >= y for x, y in zip(view.jitter, src.jitter))
    # The union of two different pipelines takes the stronger setting of each part from either.
    a = V.ViewSpec(name="a", size=(8, 8), scale=(0.3, 0.9), hflip_p=0.5, jitter=(0.4, 0.1, 0.4, 0.0), jitter_p=0.8)
    b = V.ViewSpec(name="b", size=(4, 4), scale=(0.5, 1.0), blur_p=0.2, jitter=(0.1, 0.4, 0.0, 0.2), jitter_p=0.5)
    u = union_view(a, b, "u")
    assert (u.size, u.scale, u.hflip_p, u.blur_p, u.jitter, u.jitter_p) == (
        (8, 8), (0.3, 1.0), 0.5, 0.2, (0.4, 0.4, 0.4, 0.2), 0.8)


def test_the_representation_is_the_last_maps_positions_without_a_head():
    torch.manual_seed(0)
    model = slip.create_model(get_architecture("simclr_vit_tiny").with_ssl_method("yadim")).eval()
    assert not list(model.ssl.parameters())  # no projection head
    views = [torch.randn(3, 3, 32, 32) for _ in range(2)]
    with torch.no_grad():
        out = model(views=views)["ssl"]
        for x, f in zip(views, out["maps"]):
            tokens = model.visual.forward_features(x)[:, 1:]  # the last block's grid, after the norm
            assert f.shape == (3, 16, 64) and torch.allclose(f, tokens, atol=1e-5)


@pytest.mark.usefixtures("one_torch_thread")
def test_yadim_lowers_its_loss_on_the_synthetic_corpus(corpus, tmp_path):  # noqa: F811
    # Chance is ln(1 + 15 x 16) = 5.48 (batch 16, 4 x 4 positions), plus the penalty. Measured on
    # the build machine (one thread), first and last 16 steps: 6.78 -> 5.40.
    check_lowers_its_loss(corpus, tmp_path, "yadim", 0.95)


@pytest.mark.usefixtures("one_torch_thread")
def test_yadim_beside_clip_trains_and_accumulates_like_the_plain_step(corpus, tmp_path):  # noqa: F811
    check_trains_beside_clip(corpus, tmp_path, "slip_yadim")


@pytest.mark.usefixtures("one_torch_thread")
def test_yadim_resumes_exactly(corpus, tmp_path):  # noqa: F811
    check_exact_resume(corpus, tmp_path, "yadim", ("loss", "ssl_acc"))
