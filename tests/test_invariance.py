"""``slip invariance``: the Top-K invariance score equals a plain restatement of Goodfellow et al.'s
formula and gives the known answers on constructed representations, the renderer's factors
change what they say and nothing else, layers read what they name, and the command runs end to
end and names the path of bad input."""
from __future__ import annotations

import csv
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import slip
from slip.analysis import cli
from slip.analysis.features import LoadedModel, embed, layer_features, load_model
from slip.analysis.invariance import (
    chance_score,
    invariance_summary,
    top_k,
    unit_scores,
)
from slip.analysis.render import (
    LIGHT_COLOURS,
    LIGHT_DIRECTIONS,
    make_objects,
    make_set,
    render,
)
from slip.analysis.sets import factor_groups, make_occluders, occlude, open_set
from slip.errors import MissingExtra

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _restated(features, groups, rate, include_reference):
    """Goodfellow et al.'s S(i) = L(i) / G(i) written out unit by unit with plain Python."""
    n, d = features.shape
    m = min(max(1, round(rate * n)), n - 1)
    group_of = {i: g for g in groups for i in g}
    scores = []
    for i in range(d):
        column = [float(v) for v in features[:, i]]
        threshold = sorted(column, reverse=True)[m]
        fires = [v > threshold for v in column]
        top = [z for z in range(n) if fires[z]]
        if not top:
            scores.append(float("nan"))
            continue
        local = 0.0
        for z in top:
            versions = [x for x in group_of[z] if include_reference or x != z]
            local += sum(fires[x] for x in versions) / len(versions)
        scores.append((local / len(top)) / (len(top) / n))
    return np.array(scores)


@pytest.mark.parametrize("include_reference", [False, True])
@pytest.mark.parametrize("rate", [0.01, 0.05, 0.2])
def test_scores_equal_a_plain_restatement_of_the_formula(include_reference, rate):
    rng = np.random.default_rng(0)
    sizes = rng.integers(2, 9, size=40)
    order = rng.permutation(int(sizes.sum()))  # groups need not be contiguous
    groups, start = [], 0
    for s in sizes:
        groups.append(sorted(order[start:start + s].tolist()))
        start += s
    features = rng.normal(size=(int(sizes.sum()), 30))
    features[:, 3] = 0.0  # a constant unit never fires: no score
    features[:, 4] = np.round(features[:, 4])  # ties at the threshold
    got = unit_scores(features, groups, rate, include_reference).score
    np.testing.assert_allclose(got, _restated(features, groups, rate, include_reference), rtol=1e-12)
    assert np.isnan(got[3])


def test_top_k_is_the_mean_of_the_k_best_scored_units():
    scores = np.array([3.0, np.nan, 1.0, 5.0, 2.0])
    assert top_k(scores, 2) == 4.0
    assert top_k(scores, 10) == top_k(scores, None) == 2.75  # fewer scored units than K: all of them
    assert np.isnan(top_k(np.array([np.nan]), 1))


def _coloured_objects(seed=0, objects=200, colours=5, pixels=64):
    """Objects that differ slightly in a grey texture, each seen under several strong light colours
    whose channel mean is 1, so the grey (channel-mean) image is the same under every colour."""
    rng = np.random.default_rng(seed)
    texture = 0.5 + 0.02 * rng.uniform(size=(objects, pixels))
    light = 3 * rng.dirichlet([2, 2, 2], size=(objects, colours))
    images = (texture[:, None, :, None] * light[:, :, None, :]).reshape(objects * colours, pixels, 3)
    groups = [list(range(o * colours, (o + 1) * colours)) for o in range(objects)]
    return images, groups


def test_a_colour_blind_representation_is_colour_invariant_and_a_pixel_copy_is_not():
    images, groups = _coloured_objects()
    rate = 0.01  # 10 of the 1000 images fire: two objects' five colours each
    grey = invariance_summary(images.mean(axis=-1), groups, rate=rate)
    pixels = invariance_summary(images.reshape(len(images), -1), groups, rate=rate)
    noise = invariance_summary(np.random.default_rng(1).normal(size=(len(images), 192)), groups, rate=rate)
    assert grey["top10"] == grey["top25"] == pytest.approx(1 / rate)  # the most a unit can score
    # The pixel copy's best units are no more invariant than those of random features.
    assert pixels["top10"] <= 1.5 * noise["top10"] and pixels["top10"] < 0.1 * grey["top10"]
    assert pixels["top25"] <= 1.5 * noise["top25"]


@pytest.mark.parametrize("include_reference", [False, True])
def test_features_unrelated_to_the_groups_score_chance(include_reference):
    rng = np.random.default_rng(2)
    sizes = rng.integers(2, 12, size=150)
    groups = np.split(np.arange(int(sizes.sum())), np.cumsum(sizes)[:-1])
    result = invariance_summary(rng.normal(size=(int(sizes.sum()), 2000)), groups, rate=0.02,
                                include_reference=include_reference)
    assert result["chance"] == pytest.approx(chance_score(sizes, 0.02, include_reference))
    assert result["mean_all"] == pytest.approx(result["chance"], rel=0.05)
    assert (result["chance"] > 2) == include_reference  # the reference image itself inflates chance


# --- the renderer ------------------------------------------------------------------------------

def _cube():
    return next(o for o in make_objects(seed=0, instances=2) if o.category == "cube")


def test_light_colour_changes_colours_and_not_the_silhouette():
    cube = _cube()
    white, white_mask = render(cube, (30.0, 25.0), LIGHT_DIRECTIONS[0], LIGHT_COLOURS["white"], 48)
    red, red_mask = render(cube, (30.0, 25.0), LIGHT_DIRECTIONS[0], LIGHT_COLOURS["red"], 48)
    assert white_mask.any() and np.array_equal(white_mask, red_mask)
    assert np.array_equal(white[~white_mask], red[~red_mask])  # the background is untouched
    w, r = white[white_mask].astype(float), red[red_mask].astype(float)
    assert np.abs(w - r).mean() > 10
    assert (r[:, 1] <= w[:, 1] + 1).all() and (r[:, 1].mean() < 0.6 * w[:, 1].mean())  # less green in red light


def test_light_direction_changes_shading_and_not_the_silhouette():
    cube = _cube()
    a, a_mask = render(cube, (30.0, 25.0), LIGHT_DIRECTIONS[0], LIGHT_COLOURS["white"], 48)
    b, b_mask = render(cube, (30.0, 25.0), LIGHT_DIRECTIONS[2], LIGHT_COLOURS["white"], 48)
    assert np.array_equal(a_mask, b_mask)
    assert np.abs(a.astype(float) - b.astype(float))[a_mask].mean() > 10


def test_viewpoint_changes_the_silhouette():
    cube = _cube()
    _, front = render(cube, (30.0, 25.0), LIGHT_DIRECTIONS[0], LIGHT_COLOURS["white"], 48)
    _, side = render(cube, (75.0, 25.0), LIGHT_DIRECTIONS[0], LIGHT_COLOURS["white"], 48)
    assert (front != side).sum() > 20


def test_the_same_seed_renders_the_same_set(tmp_path):
    small = {"instances": 1, "categories": ("sphere", "torus"), "viewpoints": 2, "light_dirs": 2, "light_colours": 2,
             "size": 24}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        make_set(tmp_path / name, seed=seed, **small)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 2 * (2 + 1 + 1) + 2  # images, manifest and invariance_set.json
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (tmp_path / "a" / "invariance_set.json").read_bytes() != (tmp_path / "c" / "invariance_set.json").read_bytes()


def test_instances_of_a_category_differ():
    objects = [o for o in make_objects(seed=0, instances=3) if o.category == "cylinder"]
    assert len({tuple(o.shape.values()) for o in objects}) == 3
    assert len({o.colour for o in objects}) == 3 and len({o.texture for o in objects}) == 3


# --- sets and trajectories -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("set")
    make_set(root, seed=0, size=32, instances=2, categories=("cube", "cone"), viewpoints=4, light_dirs=3,
             light_colours=3)
    return root


def test_trajectories_of_every_transformation(tiny_set):
    data = open_set(tiny_set)
    assert len(data.paths) == 4 * (4 + 2 + 2)
    sizes = {t: sorted(len(g) for g in factor_groups(data.factors, t)) for t in
             ("viewpoint", "illumination_direction", "illumination_colour", "instance", "instance_viewpoint")}
    assert sizes["viewpoint"] == [4] * 4  # every object's four azimuths under the default light
    assert sizes["illumination_direction"] == [3] * 4
    assert sizes["illumination_colour"] == [3] * 4
    assert sizes["instance"] == [2] * 16  # both cubes (cones) at each of the 8 settings of an object
    assert sizes["instance_viewpoint"] == [8, 8]  # per category: 2 objects x 4 viewpoints
    for members in factor_groups(data.factors, "illumination_colour"):
        rows = [data.factors[i] for i in members]
        assert len({r["light_colour"] for r in rows}) == 3
        assert len({(r["object"], r["viewpoint"], r["light_dir"]) for r in rows}) == 1


def test_occluders_are_seeded_and_cover_their_share_of_the_visible_square():
    assert make_occluders(5, seed=1) == make_occluders(5, seed=1) != make_occluders(6, seed=1)
    image = Image.new("RGB", (80, 40), (0, 0, 0))  # the evaluation transform keeps the centre 40 x 40
    for occluder in make_occluders(0, sizes=(0.1, 0.3), per_size=3):
        changed = np.asarray(occlude(image, occluder)).any(axis=-1)
        assert not changed[:, :20].any() and not changed[:, 60:].any()
        assert changed.sum() / 40**2 == pytest.approx(occluder.size, abs=0.04)


# --- layers and models -----------------------------------------------------------------------------

def test_layers_read_what_they_name():
    loaded = load_model("random:slip_vit_tiny", seed=0)
    model, x = loaded.model, torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        with layer_features(model, "pooled") as fn:
            torch.testing.assert_close(fn(x), model.visual(x))
        with layer_features(model, "embedding") as fn:
            torch.testing.assert_close(fn(x), model.encode_image(x))
        with layer_features(model, "block:-1") as fn:
            feats = fn(x)
        v = model.visual
        tokens = v.blocks(v.norm_pre(v._pos_embed(v.patch_embed(x))))
        torch.testing.assert_close(feats, tokens[:, v.num_prefix_tokens:].mean(dim=1))
    assert not v.blocks[-1]._forward_hooks  # the hook is gone with the context
    again = load_model("random:slip_vit_tiny", seed=0).model.state_dict()
    assert all(torch.equal(t, again[k]) for k, t in model.state_dict().items())  # seeded


def test_a_checkpoint_embeds_like_the_model_it_holds(tmp_path, tiny_set):
    random_model = load_model("random:clip_vit_tiny", seed=1)
    slip.save_checkpoint(random_model.model, tmp_path / "clip.pt")
    loaded = load_model(str(tmp_path / "clip.pt"))
    items = [(p, None) for p in open_set(tiny_set).paths[:5]]
    a = embed(random_model, items, "embedding", workers=0)
    b = embed(LoadedModel(loaded.model, loaded.preprocess, "ckpt", "ckpt"), items, "embedding", workers=0)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert a.shape == (5, 32)


# --- the command ---------------------------------------------------------------------------------

def test_the_command_end_to_end(tmp_path, capsys):
    set_dir, out = tmp_path / "set", tmp_path / "out"
    assert cli.main(["make-set", str(set_dir), "--size", "32", "--instances", "2", "--categories", "cube,torus",
                     "--viewpoints", "4", "--light-dirs", "3", "--light-colours", "3"]) == 0
    assert cli.main(["score", str(set_dir), "--model", "random:slip_vit_tiny", "--model", "simclr=random:simclr_vit_tiny",
                     "--rate", "0.05", "--occlusion-sources", "8", "--workers", "0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for t in ("occlusion", "viewpoint", "illumination_direction", "illumination_colour", "instance",
              "instance_viewpoint"):
        assert f"random:slip_vit_tiny  {t}" in printed and "simclr  " in printed
    report = json.loads((out / "invariance.json").read_text())
    assert [m["label"] for m in report["models"]] == ["random:slip_vit_tiny", "simclr"]
    assert report["settings"]["rate"] == 0.05 and report["settings"]["top_k"] == [10, 25]
    result = report["models"][0]["results"]["viewpoint"]
    assert result["images"] == 16 and result["groups"] == 4 and result["units"] == 64
    assert 0 <= result["top25"] <= result["top10"] <= 1 / 0.05 + 1e-9
    assert report["models"][0]["results"]["occlusion"]["images"] == 8 * 9
    png = (out / "invariance.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def _error(argv, capsys) -> str:
    assert cli.main(argv) == 2
    return capsys.readouterr().err


def test_bad_input_names_the_path(tmp_path, capsys, tiny_set):
    missing = tmp_path / "nowhere"
    assert str(missing) in _error(["score", str(missing), "--model", "random:slip_vit_tiny"], capsys)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no images here")
    err = _error(["score", str(tmp_path / "notes"), "--model", "random:slip_vit_tiny"], capsys)
    assert str(tmp_path / "notes") in err and "manifest.csv" in err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.csv").write_text("path,object\nx.png,a\n")
    err = _error(["score", str(bad), "--model", "random:slip_vit_tiny"], capsys)
    assert str(bad / "manifest.csv") in err and "category" in err
    gone = tmp_path / "gone"
    gone.mkdir()
    with open(tiny_set / "manifest.csv", newline="") as f:
        rows = list(csv.reader(f))
    with open(gone / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows[:3])
    err = _error(["score", str(gone), "--model", "random:slip_vit_tiny"], capsys)
    assert str(gone / rows[1][0]) in err and "not found" in err
    assert "random:nope" in _error(["score", str(tiny_set), "--model", "random:nope"], capsys)
    assert str(tmp_path / "x.pt") in _error(["score", str(tiny_set), "--model", str(tmp_path / "x.pt")], capsys)
    assert "block:9" in _error(["score", str(tiny_set), "--model", "random:slip_vit_tiny", "--layer", "block:9"], capsys)


def test_the_chart_without_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingExtra, match=r"pip install 'slip\[analysis\]'"):
        cli.write_chart({}, None)
