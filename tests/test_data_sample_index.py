"""Every batch carries each sample's global index in the corpus (``batch["index"]``): the samples
the shards' index.json lists before the sample's shard plus the sample's ordinal in its shard,
offset by the earlier sources of a mixture. The same number for the same sample on any rank,
with any workers, in every epoch and after every kind of resume."""
from __future__ import annotations

import gzip
import io
import json
import logging
import tarfile
from itertools import islice
from pathlib import Path

import pytest
import torch
from test_data_pipeline import _config, _good, _jpeg, _shard_dir, _write_tar
from test_data_resume import _batches, _resume_from

from slip.data import errors as E
from slip.data import pipeline as P
from slip.data.shards import Sample, write_shards

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------ helpers
def _by_hand(index_file: Path, path_of=None) -> dict[str, int]:
    """key -> global index, from the index's counts and the tars' member order, read with tarfile."""
    index = json.loads(index_file.read_text())
    out, start = {}, 0
    for entry in index["shards"]:
        path = path_of(entry["name"]) if path_of else index_file.parent / entry["name"]
        keys: list[str] = []
        with tarfile.open(path) as tf:
            for member in tf.getmembers():
                key = member.name.split(".", 1)[0]
                if not keys or keys[-1] != key:
                    keys.append(key)
        for ordinal, key in enumerate(keys):
            out[key] = start + ordinal
        start += entry["samples"]
    return out


def _seen(batches) -> dict[str, int]:
    """key -> index over ``batches``; a key seen twice (epoch_samples cycles) has one index."""
    out: dict[str, int] = {}
    for batch in batches:
        index = batch["index"]
        assert index.dtype == torch.int64 and index.shape == (len(batch["key"]),)
        for key, i in zip(batch["key"], index.tolist()):
            assert out.setdefault(key, i) == i, key
    return out


def _indices(batches) -> list[list[int]]:
    return [b["index"].tolist() for b in batches]


def _index_json(root: Path, entries: list[tuple[str, int]], corpus: str | None = None) -> Path:
    path = root / "index.json"
    path.write_text(json.dumps({"format": "slip-shards/1", "corpus": corpus,
                                "shards": [{"name": n, "samples": c} for n, c in entries],
                                "total_samples": sum(c for _, c in entries), "skipped": {}}))
    return path


# --------------------------------------------------------------------------- the definition
def test_indices_of_make_shards_output_are_unique_and_follow_the_definition(tmp_path):
    samples = [Sample(f"k{i:03d}", _jpeg(i), None if i == 7 else f"caption {i}") for i in range(24)]
    index = write_shards(samples, tmp_path / "out", samples_per_shard=5, progress=False)
    assert [s["samples"] for s in index["shards"]] == [5, 5, 5, 5, 3] and index["skipped"] == {"missing_caption": 1}
    loader = P.SlipLoader(str(tmp_path / "out"), _config(shuffle_buffer=10))
    seen = _seen(loader)
    assert seen == _by_hand(tmp_path / "out" / "index.json")
    # The written samples in order (k007 was skipped when writing, so it has no index).
    written = [f"k{i:03d}" for i in range(24) if i != 7]
    assert seen == {key: i for i, key in enumerate(written)}
    assert loader.sample_index.size == 23 and loader.sample_index.offsets == (0,)
    assert loader.require_sample_index("pirl") is loader.sample_index


def test_the_same_sample_has_the_same_index_for_any_ranks_workers_buffer_and_epoch(tmp_path):
    d = _shard_dir(tmp_path / "s", "s", shards=5, per_shard=6, index=True)
    expected = _by_hand(d / "index.json")
    assert sorted(expected.values()) == list(range(30))
    for kw in ({"shuffle_buffer": 0}, {"shuffle_buffer": 10}, {"workers": 2, "shuffle_buffer": 10}):
        loader = P.SlipLoader(str(d), _config(**kw))
        assert _seen(loader) == expected, kw
        loader.set_epoch(1)
        batches = list(loader)
        assert _seen(batches) == expected, kw
        assert sorted(i for b in batches for i in b["index"].tolist()) == list(range(30))  # unique
    per_rank = [_seen(P.SlipLoader(str(d), _config(rank=r, world_size=2, workers=w)))
                for r, w in ((0, 1), (1, 2))]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert {**per_rank[0], **per_rank[1]} == expected
    # Resampled mode draws shards with replacement: repeats keep their sample's index.
    resampled = list(islice(iter(P.SlipLoader(str(d), _config(mode="resampled", batch_size=8))), 10))
    seen = _seen(resampled)
    assert seen == {k: expected[k] for k in seen}


# ----------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_by_seeking_restores_the_indices(tmp_path, workers, caplog):
    d = _shard_dir(tmp_path / "s", "s", shards=3, per_shard=7, index=True)
    # 21 samples, 28 per epoch: workers cycle over their shards, checkpoints fall mid-shard and in the buffer.
    cfg = _config(workers=workers, epoch_samples=28, shuffle_buffer=10, shuffle_initial=4)
    full = _batches(P.SlipLoader(str(d), cfg))
    assert _seen(full) == _by_hand(d / "index.json")
    for k in (1, 2, 4, len(full) - 1):
        resumed, state = _resume_from(str(d), cfg, k)
        stream = next(iter(state["workers"].values()))["stream"]
        assert all(len(ref) == 6 and isinstance(ref[5], int) for ref in stream["shuffle"]["buffer"])
        assert all("ordinal" in r for r in stream["readers"])
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="slip.data"):
            assert _indices(_batches(resumed)) == _indices(full[k:]), k
        if workers == 0:  # (the workers' log records do not reach caplog)
            assert "resumed after sample" in caplog.text and "re-reading" not in caplog.text  # sought, not replayed


def test_states_without_ordinals_resume_exactly_by_replay(tmp_path, caplog):
    # A checkpoint of an older slip: reader states without "ordinal", buffer refs of 4 entries.
    d = _shard_dir(tmp_path / "s", "s", shards=3, per_shard=7, index=True)
    cfg = _config(epoch_samples=28, shuffle_buffer=10, shuffle_initial=4)
    full = _batches(P.SlipLoader(str(d), cfg))
    for k in (2, 5):
        loader = P.SlipLoader(str(d), cfg)
        _batches(loader, k)
        state = loader.state_dict()
        stream = state["workers"]["0"]["stream"]
        for reader in stream["readers"]:
            del reader["ordinal"]
        stream["shuffle"]["buffer"] = [ref[:4] for ref in stream["shuffle"]["buffer"]]
        resumed = P.SlipLoader(str(d), cfg)
        resumed.load_state_dict(state)
        with caplog.at_level(logging.INFO, logger="slip.data"):
            rest = _batches(resumed)
        assert "the samples' global indices are counted again" in caplog.text
        assert _indices(rest) == _indices(full[k:]) and [b["key"] for b in rest] == [b["key"] for b in full[k:]]
    # Without an index (no indices to restore) the same old state still resumes by seeking.
    plain = _shard_dir(tmp_path / "p", "p", shards=3, per_shard=7)
    full = _batches(P.SlipLoader(str(plain), cfg))
    loader = P.SlipLoader(str(plain), cfg)
    _batches(loader, 2)
    state = loader.state_dict()
    for reader in state["workers"]["0"]["stream"]["readers"]:
        del reader["ordinal"]
    state["workers"]["0"]["stream"]["shuffle"]["buffer"] = [r[:4] for r in state["workers"]["0"]["stream"]["shuffle"]["buffer"]]
    resumed = P.SlipLoader(str(plain), cfg)
    resumed.load_state_dict(state)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="slip.data"):
        assert [b["key"] for b in _batches(resumed)] == [b["key"] for b in full[2:]]
    assert "resumed after sample" in caplog.text and "re-reading" not in caplog.text


@pytest.mark.parametrize("kind", ["pipe", "gzip"])
def test_shards_that_cannot_seek_replay_the_same_indices(tmp_path, kind, caplog):
    plain = _shard_dir(tmp_path / "s", "s", shards=3, per_shard=6)
    remote = tmp_path / "remote"
    remote.mkdir()
    if kind == "pipe":  # an index of remote shards lists their URLs
        index = _index_json(remote, [(f"pipe:cat {plain}/s-{i:06d}.tar", 6) for i in range(3)])
    else:
        for i in range(3):
            tar = plain / f"s-{i:06d}.tar"
            (remote / f"s-{i:06d}.tar.gz").write_bytes(gzip.compress(tar.read_bytes()))
        index = _index_json(remote, [(f"s-{i:06d}.tar.gz", 6) for i in range(3)])
    expected = _by_hand(_index_json(tmp_path / "s", [(f"s-{i:06d}.tar", 6) for i in range(3)]))
    cfg = _config(epoch_samples=18)
    full = _batches(P.SlipLoader(str(index), cfg))
    assert _seen(full) == expected
    for k in (1, 3):
        resumed, _ = _resume_from(str(index), cfg, k)
        with caplog.at_level(logging.INFO, logger="slip.data"):
            assert _indices(_batches(resumed)) == _indices(full[k:])
        assert "cannot be read from an offset" in caplog.text


# ------------------------------------------------------------------------------- bad input
def test_skipped_samples_do_not_shift_the_indices_of_the_others(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    _write_tar(d / "s-000000.tar", _good("a0", 1) + _good("a1", 2) + [("a2.jpg", b"not a jpeg"), ("a2.txt", b"bad")]
               + _good("a3", 3))
    full = _write_tar(tmp_path / "full.tar", _good("b0", 4) + _good("b1", 5) + _good("b2", 6) + _good("b3", 7))
    raw = full.read_bytes()
    (d / "s-000001.tar").write_bytes(raw[: raw.index(b"b2.jpg") + 700])  # a tar cut inside b2's image
    _write_tar(d / "s-000002.tar", _good("c0", 8) + _good("c1", 9))
    _index_json(d, [("s-000000.tar", 4), ("s-000001.tar", 4), ("s-000002.tar", 2)])
    loader = P.SlipLoader(str(d), _config(workers=2, shuffle_buffer=0))
    seen = _seen(loader)
    assert seen == {"a0": 0, "a1": 1, "a3": 3, "b0": 4, "b1": 5, "c0": 8, "c1": 9}
    assert loader.skipped() == {E.NOT_AN_IMAGE: 1, E.TAR_ERROR: 1}


def test_a_shard_holding_more_samples_than_its_index_says_ends_at_its_count(tmp_path, caplog):
    d = _shard_dir(tmp_path / "s", "s", shards=2, per_shard=6)
    _index_json(d, [("s-000000.tar", 4), ("s-000001.tar", 6)])  # shard 0 holds 2 more than listed
    cfg = _config(shuffle_buffer=0, shuffle_shards=False)
    loader = P.SlipLoader(str(d), cfg)
    with caplog.at_level(logging.WARNING, logger="slip.data"):
        seen = _seen(loader)
    assert seen == {**{f"s00_{i:03d}": i for i in range(4)}, **{f"s01_{i:03d}": 4 + i for i in range(6)}}
    assert loader.skipped() == {E.TAR_ERROR: 1}
    assert "holds more samples than its index.json says (4)" in caplog.text and "s00_004" in caplog.text
    # A checkpoint right at the indexed end of the shard resumes to the same batches and count.
    full = _batches(P.SlipLoader(str(d), cfg))
    resumed, _ = _resume_from(str(d), cfg, 1)
    assert _indices(_batches(resumed)) == _indices(full[1:]) and resumed.skipped() == {E.TAR_ERROR: 1}
    # Fewer samples than listed leave unused indices and shift nothing.
    _index_json(d, [("s-000000.tar", 9), ("s-000001.tar", 6)])
    loader = P.SlipLoader(str(d), cfg)
    assert _seen(loader) == {**{f"s00_{i:03d}": i for i in range(6)}, **{f"s01_{i:03d}": 9 + i for i in range(6)}}
    assert loader.skipped() == {} and loader.sample_index.size == 15


# -------------------------------------------------------------------------------- mixtures
def test_mixtures_offset_each_source_by_the_earlier_ones(tmp_path):
    a = _shard_dir(tmp_path / "a", "a", shards=3, per_shard=5, index=True, corpus="cc3m")
    b = _shard_dir(tmp_path / "b", "b", shards=2, per_shard=4, index=True, corpus="cc12m")
    by_a, by_b = _by_hand(a / "index.json"), _by_hand(b / "index.json")
    loader = P.SlipLoader(f"{a}::0.7,{b}::0.3", _config(workers=2))
    assert _seen(loader) == {**by_a, **{k: 15 + i for k, i in by_b.items()}}
    assert loader.sample_index.offsets == (0, 15) and loader.sample_index.size == 23
    swapped = P.SlipLoader([(str(b), 0.3), (str(a), 0.7)], _config())
    assert _seen(swapped) == {**by_b, **{k: 8 + i for k, i in by_a.items()}}
    for cfg in (_config(epoch_samples=30), _config(mode="resampled", epoch_samples=40)):
        spec = f"{a}::0.7,{b}::0.3"
        full = _batches(P.SlipLoader(spec, cfg))
        seen = _seen(full)
        assert all(i == (by_a[k] if k in by_a else 15 + by_b[k]) for k, i in seen.items())
        for k in (1, len(full) // 2):
            resumed, _ = _resume_from(spec, cfg, k)
            assert _indices(_batches(resumed)) == _indices(full[k:]), (cfg.mode, k)


# ----------------------------------------------------------------------- without an index
def test_without_an_index_batches_have_no_index_and_asking_for_it_names_the_missing_file(tmp_path):
    indexed = _shard_dir(tmp_path / "i", "i", shards=3, per_shard=4, index=True)
    plain = _shard_dir(tmp_path / "p", "p", shards=2, per_shard=4)
    for spec in (str(plain), f"{indexed}::0.5,{plain}::0.5", f"pipe:cat {plain}/p-{{000000..000001}}.tar"):
        loader = P.SlipLoader(spec, _config())
        batches = list(loader)
        assert batches and all("index" not in b for b in batches)
        assert loader.sample_index is None
        with pytest.raises(P.SampleIndexError, match="pirl needs each sample's global index") as info:
            loader.require_sample_index("pirl")
        assert "index.json" in str(info.value) and str(plain) in str(info.value)
        assert str(indexed) not in str(info.value)  # only the sources without an index are named
    # An index listing shards without sample counts (written by hand) numbers nothing.
    (plain / "index.json").write_text(json.dumps({"format": "slip-shards/1", "shards": ["p-000000.tar", "p-000001.tar"]}))
    loader = P.SlipLoader(str(plain), _config())
    assert all("index" not in b for b in loader)
    with pytest.raises(P.SampleIndexError, match=r"shards\[0\] \(p-000000.tar\) has no sample count"):
        loader.require_sample_index()
    # One shard listed under two names would give its samples two indices.
    _index_json(plain, [("p-000000.tar", 4), ("p-000001.tar", 4), ("./p-000000.tar", 4)])
    loader = P.SlipLoader(str(plain), _config())
    assert loader.sample_index is None
    with pytest.raises(P.SampleIndexError, match=r"lists shard ./p-000000.tar twice"):
        loader.require_sample_index()


def test_a_pattern_is_numbered_by_the_index_that_lists_its_shards(tmp_path):
    d = _shard_dir(tmp_path / "s", "s", shards=3, per_shard=4, index=True)
    expected = _by_hand(d / "index.json")
    loader = P.SlipLoader(str(d / "s-{000001..000002}.tar"), _config())
    seen = _seen(loader)
    assert seen == {k: i for k, i in expected.items() if not k.startswith("s00")}
    assert loader.sample_index.size == 12  # the whole index: the subset keeps the corpus's numbers
    # A pattern naming a shard the index does not list is not numbered.
    _index_json(d, [("s-000000.tar", 4), ("s-000001.tar", 4)])
    loader = P.SlipLoader(str(d / "s-{000000..000002}.tar"), _config())
    assert all("index" not in b for b in loader)
    with pytest.raises(P.SampleIndexError, match="does not list .*s-000002.tar"):
        loader.require_sample_index()


# ------------------------------------------------------------------------------ the trainer
def test_the_index_travels_with_the_batch_to_the_model(tmp_path):
    from slip.data.augment import BatchAugment
    from slip.runtime import to_device
    from slip.train.step import model_inputs
    from slip.train.trainer import _split

    d = _shard_dir(tmp_path / "s", "s", shards=1, per_shard=4, index=True)
    loader = P.SlipLoader(str(d), _config(method="slip-simclr", shuffle_buffer=0))
    batch = next(iter(loader))
    assert batch["index"].tolist() == [0, 1, 2, 3]
    moved = BatchAugment(loader.views)(to_device(batch, torch.device("cpu")))
    assert torch.equal(moved["index"], batch["index"])
    halves = _split(moved, 2)
    assert [h["index"].tolist() for h in halves] == [[0, 1], [2, 3]] and [h["key"] for h in halves] == [
        batch["key"][:2], batch["key"][2:]]
    # The model hands it on only to an SSL method that needs it (PIRL's memory bank; tested there).
    assert model_inputs(moved)["index"] is moved["index"]


def test_member_order_defines_the_ordinal(tmp_path):
    # Meta members and members without an extension are no samples; a repeated extension is
    # dropped from its sample; every other key group is one sample, in file order.
    members = [("__meta__", b"m"), ("x.jpg", _jpeg(1)), ("x.txt", b"x"), ("x.TXT", b"dup"),
               ("noext", b"?"), ("y.jpg", _jpeg(2)), ("y.txt", b"y"), ("z.jpg", _jpeg(3)), ("z.txt", b"z")]
    d = tmp_path / "s"
    d.mkdir()
    path = d / "s-000000.tar"
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    _index_json(d, [("s-000000.tar", 3)])
    assert _seen(P.SlipLoader(str(d), _config(shuffle_buffer=0))) == {"x": 0, "y": 1, "z": 2}
