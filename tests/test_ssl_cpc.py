"""CPC v2: the loss against hand-computed values, the context network's rows-above causality, the
patch grid's geometry (boxes in the parent crop, stride and overlap, both decode paths), and
training through the trainer (learning, beside CLIP, exact resume)."""
from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch
from test_data_decode_device import _config, _device_batches, _encode, _photo, _tokens
from test_ssl import (  # noqa: F401  (corpus: the shared fixture)
    _run,
    check_exact_resume,
    check_lowers_its_loss,
    check_trains_beside_clip,
    corpus,
)
from test_ssl_pirl import photos  # noqa: F401  (photos: a small JPEG corpus)

import slip
from slip.data import decode as D
from slip.data import pipeline as P
from slip.data import views as V
from slip.models import get_architecture
from slip.ssl.cpc import ContextNetwork, cpc_nce


def _model(name: str = "simclr_vit_tiny", grid: int = 3):
    torch.manual_seed(0)
    return slip.create_model(get_architecture(name).with_ssl_method("cpc", patch_grid=grid))


# ------------------------------------------------------------------------------------ the loss
def _by_hand(preds, z, t):
    """CPC's InfoNCE with plain Python loops: per k, every (image, row, column) with a row k below."""
    n, c, g, _ = z.shape
    keys = [(j, r, q) for j in range(n) for r in range(g) for q in range(g)]
    per_k = []
    for k, p in enumerate(preds, start=1):
        terms = []
        for i in range(n):
            for r in range(g - k):
                for q in range(g):
                    s = {key: sum(p[i, d, r, q].item() * z[key[0], d, key[1], key[2]].item() for d in range(c)) / t
                         for key in keys}
                    pos = s[(i, r + k, q)]
                    terms.append(-(pos - math.log(sum(math.exp(v) for v in s.values()))))
        per_k.append(sum(terms) / len(terms))
    return sum(per_k) / len(per_k)


def test_nce_matches_a_hand_computed_value():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(2, 3, 3, 3, generator=gen)
    preds = [torch.randn(2, 3, 3, 3, generator=gen), torch.randn(2, 3, 3, 3, generator=gen)]
    for t in (1.0, 0.5):
        assert cpc_nce(preds, z, t)["loss"].item() == pytest.approx(_by_hand(preds, z, t), rel=1e-6)


def test_a_perfect_prediction_scores_its_target_above_every_other_patch():
    # z: one-hot patch features (every patch its own direction); predicting exactly the patch k
    # rows below at a large scale gives accuracy 100 and a loss near 0; predicting the patch
    # k + 1 rows below (a wrong row) gives accuracy 0.
    n, g = 2, 3
    c = n * g * g
    z = torch.eye(c).reshape(c, n, g, g).permute(1, 0, 2, 3).contiguous()  # (N, C, G, G)
    right = [torch.zeros_like(z), torch.zeros_like(z)]
    for k in (1, 2):
        right[k - 1][:, :, : g - k] = 20 * z[:, :, k:]
    out = cpc_nce(right, z)
    assert out["acc"].item() == 100.0 and out["loss"].item() < 1e-3
    wrong = [torch.zeros_like(z)]
    wrong[0][:, :, :1] = 20 * z[:, :, 2:]  # row 0 predicts row 2, scored as the k = 1 prediction (row 1)
    assert cpc_nce(wrong, z)["acc"].item() == 0.0


def test_scores_in_chunks_give_the_loss_accuracy_and_gradients_of_all_at_once(monkeypatch):
    from slip.ssl import cpc

    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 6, 4, 4, generator=g)
    preds = [torch.randn(3, 6, 4, 4, generator=g) for _ in range(2)]

    def run():
        zz, pp = z.clone().requires_grad_(), [p.clone().requires_grad_() for p in preds]
        out = cpc_nce(pp, zz)
        out["loss"].backward()
        return out, zz.grad, [p.grad for p in pp]

    whole, z_grad, p_grads = run()
    monkeypatch.setattr(cpc, "SCORE_CHUNK_ELEMENTS", 5 * 48)  # 5 rows of 48 keys per chunk, recomputed in backward
    chunked, z_grad2, p_grads2 = run()
    assert chunked["loss"].item() == pytest.approx(whole["loss"].item(), rel=1e-6)
    assert chunked["acc"].item() == whole["acc"].item()
    assert torch.allclose(z_grad2, z_grad, atol=1e-6) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(p_grads2, p_grads))


# ------------------------------------------------------------------ the context network
def test_the_context_network_sees_only_the_rows_above():
    model = _model(grid=7).eval()
    assert model.ssl.steps == 5 and len(model.ssl.context.blocks) == 5
    z = torch.randn(2, 64, 7, 7)
    with torch.no_grad():
        before = model.ssl.predict(z)
        for r in range(7):
            changed = z.clone()
            changed[:, :, r:] = torch.randn(2, 64, 7 - r, 7)  # rows r and below
            after = model.ssl.predict(changed)
            for p, q in zip(before, after):
                assert torch.equal(p[:, :, :r], q[:, :, :r]), r  # the rows above r are unchanged
                assert not torch.allclose(p[:, :, r], q[:, :, r])  # row r sees its own row
    # ... and five rows above it (five blocks of 2-row kernels, bolts' PixelCNN): row 5 depends on
    # row 0, row 6 does not.
    changed = z.clone()
    changed[:, :, 0] += 1
    with torch.no_grad():
        after = model.ssl.predict(changed)[0]
    assert not torch.allclose(after[:, :, 5], before[0][:, :, 5])
    assert torch.equal(after[:, :, 6], before[0][:, :, 6])


def test_the_context_block_matches_a_hand_computed_value():
    # One block of width 1 and hidden width 1: x + expand(relu(rows(cols(relu(reduce(x)))))), then
    # a ReLU; cols sums each row's neighbours (zero padding at the sides), rows adds the row above
    # (zero padding on top) to 10 times the row itself, expand scales by -0.01.
    net = ContextNetwork(1, blocks=1, hidden=1)
    block = net.blocks[0]
    with torch.no_grad():
        for conv, weight in ((block.reduce, [[[[1.0]]]]), (block.cols, [[[[1.0, 1.0, 1.0]]]]),
                             (block.rows, [[[[1.0], [10.0]]]]), (block.expand, [[[[-0.01]]]])):
            conv.weight.copy_(torch.tensor(weight))
            conv.bias.zero_()
        x = torch.tensor([[[[1.0, -2.0, 3.0], [0.5, 4.0, -1.0], [2.0, 0.0, 1.0]]]])
        out = net(x)[0, 0]
    r = [[max(v, 0.0) for v in row] for row in x[0, 0].tolist()]  # relu(reduce(x))
    cols = [[sum(row[q] for q in (c - 1, c, c + 1) if 0 <= q < 3) for c in range(3)] for row in r]
    rows = [[(cols[i - 1][c] if i > 0 else 0.0) + 10 * cols[i][c] for c in range(3)] for i in range(3)]
    expected = [max(x[0, 0, i, c].item() - 0.01 * max(rows[i][c], 0.0), 0.0) for i in range(3) for c in range(3)]
    assert out.flatten().tolist() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx([0.9, 0.0, 2.7, 0.04, 3.51, 0.0, 1.755, 0.0, 0.86])  # by hand


def test_the_model_stacks_the_patches_row_major_into_the_grid():
    model = _model().eval()
    feats = [torch.full((2, 64), float(i)) for i in range(9)]
    z = model.ssl.grid_features(feats)
    assert z.shape == (2, 64, 3, 3) and z[0, 0].tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert model.ssl.num_views == 9 and len(model.ssl.predictors) == 2


# ------------------------------------------------------------------------------ the patch grid
@pytest.mark.parametrize("grid, size, patch_size, px", [(7, 224, 16, 64), (3, 32, 8, 16), (7, 256, 16, 64)])
def test_cpc_views_are_one_row_major_group_of_half_overlapping_patches(grid, size, patch_size, px):
    views = V.cpc_views(size, grid=grid, patch_size=patch_size)
    assert len(views) == grid * grid and {v.size for v in views} == {(px, px)}
    assert {v.tile_of for v in views} == {"cpc_grid"} and {v.tile_layout for v in views} == {"grid"}
    assert views[0].tile_fraction == pytest.approx(2 * views[0].tile_stride)  # 64 px at stride 32
    assert (grid - 1) * views[0].tile_stride + views[0].tile_fraction == pytest.approx(1.0)
    V.MethodViews(clip=V.clip_view(size), ssl=views)  # a valid declaration beside CLIP


def test_cpc_views_augment_as_bolts_cpc_on_imagenet():
    # Lightning-Bolts' CPCTrainTransformsImageNet128: crop scale (0.3, 1), ratio (0.7, 1.4),
    # jitter (0.4, 0.4, 0.4, 0.1) at p 0.8, grayscale 0.25, flip 0.5, no blur or solarisation.
    for v in V.cpc_views(224):
        assert (v.scale, v.ratio, v.jitter, v.jitter_p, v.grayscale_p, v.hflip_p, v.blur_p, v.solarize_p) == (
            (0.3, 1.0), (0.7, 1.4), (0.4, 0.4, 0.4, 0.1), 0.8, 0.25, 0.5, 0.0, 0.0)


def test_patch_grid_settings_are_validated():
    with pytest.raises(ValueError, match="do not fit"):
        V.ViewSpec(name="p", size=(8, 8), scale=(1, 1), tile_of="g", grid=3, tile_layout="grid", tile_fraction=0.5,
                   tile_stride=0.5)
    with pytest.raises(ValueError, match="tile_layout must be"):
        V.ViewSpec(name="p", size=(8, 8), scale=(1, 1), tile_of="g", tile_layout="spiral")
    with pytest.raises(ValueError, match="tile_stride is for"):
        V.ViewSpec(name="p", size=(8, 8), scale=(1, 1), tile_of="g", tile_stride=0.1)
    with pytest.raises(ValueError, match="different tile_stride"):
        views = V.cpc_views(32, grid=2, patch_size=8)
        V.MethodViews(clip=None, ssl=(*views[:3], dataclasses.replace(views[3], tile_stride=0.2)))


@pytest.mark.parametrize("width, height", [(256, 256), (300, 200), (97, 131)])
def test_patch_boxes_lie_in_the_parent_crop_at_the_declared_stride(width, height):
    parent, boxes = D.grid_boxes(random.Random(3), width, height, (0.3, 1.0), (3 / 4, 4 / 3), 7, 1 / 4, 1 / 8)
    left, top, w, h = parent
    assert parent == D.sample_crop(random.Random(3), width, height, (0.3, 1.0), (3 / 4, 4 / 3))  # the only draw
    assert len(boxes) == 49
    for k, (x, y, bw, bh) in enumerate(boxes):
        r, c = divmod(k, 7)
        assert left <= x and x + bw <= left + w and top <= y and y + bh <= top + h
        assert x == left + round(c * w / 8) and y == top + round(r * h / 8)  # row-major, stride 1/8
        assert abs(bw - w / 4) <= 1 and abs(bh - h / 4) <= 1  # sides 1/4 of the parent's
    # Neighbours overlap by half a patch: 7 patches of 64 at stride 32 tile a 256 px crop exactly.
    _, exact = D.grid_boxes(random.Random(0), 256, 256, (1.0, 1.0), (1.0, 1.0), 7, 1 / 4, 1 / 8)
    assert [b[0] for b in exact[:7]] == list(range(0, 224, 32)) and {b[2] for b in exact} == {64}
    assert [b[1] for b in exact[::7]] == list(range(0, 224, 32)) and {b[3] for b in exact} == {64}


def test_each_patch_view_is_cut_from_its_planned_box():
    data = _encode(_photo(4, 200, 150), quality=95)
    views = V.cpc_views(32, grid=3, patch_size=8)
    _, boxes = D.plan_crops(200, 150, views, random.Random(7), allow_draft=False)
    assert boxes == list(D.grid_boxes(random.Random(7), 200, 150, (0.3, 1.0), (0.7, 1.4), 3, 0.5, 0.25)[1])
    crops = D.decode_views(data, views, random.Random(7), allow_draft=False)
    pixels = D._decode_pixels(data, D.open_image(data), 1)
    for crop, box, view in zip(crops, boxes, views):
        assert torch.equal(crop, D.resize_crop(pixels, box, view.size))


def test_device_decoded_patches_equal_worker_decoded_ones_within_a_grey_level(photos):  # noqa: F811
    views = V.MethodViews(clip=None, ssl=V.cpc_views(32, grid=3, patch_size=8))
    worker = list(P.SlipLoader(photos, _config(views=views, allow_draft=False), tokenizer=_tokens))
    device, _, _ = _device_batches(photos, _config(views=views, decode="device"))
    assert [b["key"] for b in device] == [b["key"] for b in worker]
    for a, b in zip(device, worker):
        assert len(a["views"]) == 9
        for x, y in zip(a["views"], b["views"]):
            assert x.shape == y.shape and (x.int() - y.int()).abs().max() <= 1


# ---------------------------------------------------------------------- through the trainer
@pytest.mark.usefixtures("one_torch_thread")
def test_cpc_lowers_its_loss_on_the_synthetic_corpus(corpus, tmp_path):  # noqa: F811
    # Chance is ln(16 x 9) = 4.97 (batch 16, 3 x 3 patches). Measured on the build machine (one
    # thread), first and last 16 steps: 5.10 -> 4.64 (5.59 -> 4.68 with the former context
    # network of G - 1 full-width blocks, which started further above chance).
    records = check_lowers_its_loss(corpus, tmp_path, "cpc", 0.93)
    assert sum(r["ssl_loss"] for r in records[-16:]) / 16 < 0.95 * math.log(16 * 9)


@pytest.mark.usefixtures("one_torch_thread")
def test_cpc_beside_clip_trains_and_accumulates_like_the_plain_step(corpus, tmp_path):  # noqa: F811
    check_trains_beside_clip(corpus, tmp_path, "slip_cpc")


@pytest.mark.usefixtures("one_torch_thread")
def test_cpc_resumes_exactly(corpus, tmp_path):  # noqa: F811
    check_exact_resume(corpus, tmp_path, "cpc", ("loss", "ssl_acc"))


@pytest.mark.usefixtures("one_torch_thread")
def test_cpc_trains_a_resnet_tower_one_call_per_patch(corpus, tmp_path):  # noqa: F811
    result, records = _run(corpus, tmp_path / "run", "cpc", "model.name=simclr_resnet_tiny", "train.max_steps=2")
    assert result.step == 2 and all(math.isfinite(r["loss"]) for r in records)
