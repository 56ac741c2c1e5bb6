"""A loader restored from its state_dict continues with exactly the batches an uninterrupted
loader would have produced: same samples, same crops, same order."""
from __future__ import annotations

import gzip
import io
import logging
import multiprocessing
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_pipeline import _config, _good, _shard_dir, _write_tar

from slip.data import pipeline as P
from slip.data import stages, tars

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batches(loader, limit=None):
    out = []
    for batch in loader:
        out.append(batch)
        if limit is not None and len(out) == limit:
            break
    return out


def _same(a, b):
    assert a["key"] == b["key"]
    assert torch.equal(a["image"], b["image"])
    assert len(a.get("views", ())) == len(b.get("views", ()))
    for x, y in zip(a.get("views", ()), b.get("views", ())):
        assert torch.equal(x, y)
    assert torch.equal(a["text"], b["text"])


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_reproduces_the_remaining_batches(tmp_path, workers):
    shards = _shard_dir(tmp_path / "s", "s", shards=4, per_shard=9, index=True)
    # 36 samples but 52 per epoch: workers cycle over their shards (several passes per epoch).
    cfg = _config(method="slip-simclr", workers=workers, epoch_samples=52, partial_batches=False)
    full = _batches(P.SlipLoader(str(shards), cfg))
    assert len(full) == 14 if workers == 2 else 13
    for k in (1, 3, len(full) - 1):
        loader = P.SlipLoader(str(shards), cfg)
        _batches(loader, k)
        state = loader.state_dict()
        resumed = P.SlipLoader(str(shards), cfg)
        resumed.load_state_dict(state)
        rest = _batches(resumed)
        assert len(rest) == len(full) - k, k
        for a, b in zip(rest, full[k:]):
            _same(a, b)


def test_resumed_epoch_does_not_decode_consumed_samples(tmp_path, monkeypatch):
    shards = _shard_dir(tmp_path / "s", "s", shards=2, per_shard=8, index=True)
    cfg = _config(workers=0, epoch_samples=16, shuffle_buffer=0)
    loader = P.SlipLoader(str(shards), cfg)
    _batches(loader, 2)
    state = loader.state_dict()
    decoded = []
    real = stages.decode_views
    monkeypatch.setattr(stages, "decode_views", lambda *a, **k: decoded.append(1) or real(*a, **k))
    resumed = P.SlipLoader(str(shards), cfg)
    resumed.load_state_dict(state)
    assert len(_batches(resumed)) == 2
    assert len(decoded) == 8  # only the 8 samples after the checkpoint


def test_state_survives_a_weights_only_checkpoint_and_set_epoch_starts_afresh(tmp_path):
    shards = _shard_dir(tmp_path / "s", "s", shards=2, per_shard=8, index=True)
    cfg = _config(workers=0, epoch_samples=16)
    loader = P.SlipLoader(str(shards), cfg)
    first = _batches(loader)
    _batches(loader, 1)
    torch.save(loader.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["handed_out"] == 1 and state["epoch"] == 0
    loader.load_state_dict(state)
    loader.set_epoch(0)  # a new epoch selection forgets the pending position
    assert [b["key"] for b in _batches(loader)] == [b["key"] for b in first]


# ------------------------------------------------------------------ cheap resume: seek, don't replay
class _Counted:
    """A shard stream that adds the bytes read through it to a counter shared with forked workers."""

    def __init__(self, stream, total):
        self._stream, self._total = stream, total

    def read(self, *args):
        data = self._stream.read(*args)
        with self._total.get_lock():
            self._total.value += len(data)
        return data

    def __getattr__(self, name):  # seek, tell, seekable, close ... as the stream has them
        return getattr(self._stream, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stream.close()


@pytest.fixture
def bytes_read(monkeypatch):
    """Counts every byte read from shards, in this process and in DataLoader workers."""
    total = multiprocessing.Value("q", 0)
    real = tars.open_shard
    monkeypatch.setattr(tars, "open_shard", lambda url: _Counted(real(url), total))
    return total


def _heavy_shards(root: Path, shards: int, per_shard: int, payload: int = 20_000) -> Path:
    """Shards whose samples carry a large extra member, so that byte counts are dominated by
    samples rather than tar headers and read-ahead."""
    root.mkdir(parents=True)
    rs = np.random.RandomState(0)
    for s in range(shards):
        members = []
        for i in range(per_shard):
            key = f"h{s:02d}_{i:03d}"
            members += _good(key, seed=s * 100 + i) + [(f"{key}.bin", rs.bytes(payload))]
        _write_tar(root / f"h-{s:06d}.tar", members)
    return root


def _resume_from(spec, cfg, k):
    loader = P.SlipLoader(spec, cfg)
    _batches(loader, k)
    resumed = P.SlipLoader(spec, cfg)
    resumed.load_state_dict(loader.state_dict())
    return resumed, loader.state_dict()


@pytest.mark.parametrize("shuffle_buffer", [0, 10])
def test_resume_after_every_batch_of_an_epoch_gives_the_uninterrupted_batches(tmp_path, shuffle_buffer):
    shards = _shard_dir(tmp_path / "s", "s", shards=3, per_shard=7, index=True)
    # 21 samples, 28 per epoch, batches of 4 that end inside shards, at shard ends and at pass ends.
    cfg = _config(method="slip-simclr", epoch_samples=28, shuffle_buffer=shuffle_buffer, partial_batches=True)
    full = _batches(P.SlipLoader(str(shards), cfg))
    for k in range(1, len(full)):
        resumed, state = _resume_from(str(shards), cfg, k)
        assert state["workers"]["0"]["stream"] is not None
        rest = _batches(resumed)
        assert [b["key"] for b in rest] == [b["key"] for b in full[k:]], k
        for a, b in zip(rest, full[k:]):
            _same(a, b)


def test_resume_reads_its_buffer_and_one_shard_not_the_consumed_epoch(tmp_path, bytes_read):
    shards = _heavy_shards(tmp_path / "h", shards=6, per_shard=10)
    cfg = _config(shuffle_buffer=8, shuffle_initial=8, shuffle_shards=False)
    full = _batches(P.SlipLoader(str(shards), cfg))
    shard_bytes = max(p.stat().st_size for p in shards.glob("*.tar"))
    sample_span = 3 * 512 + 20_000 + 2_000 + 512  # headers + payload + JPEG (< 2 kB) + caption
    for k in (2, len(full) // 2, len(full) - 2):  # early, middle, in the last shard
        resumed, state = _resume_from(str(shards), cfg, k)
        buffered = len(state["workers"]["0"]["stream"]["shuffle"]["buffer"])
        bytes_read.value = 0
        it = iter(resumed)
        first = next(it)
        seek_cost = bytes_read.value
        assert first["key"] == full[k]["key"]
        # tarfile reads 10 kB records: one record of read-ahead per buffered sample at most.
        assert seek_cost <= buffered * (sample_span + 10_240) + shard_bytes, k
        assert [b["key"] for b in it] == [b["key"] for b in full[k + 1:]]
        # The same position replayed (a state without stream positions) re-reads everything before it.
        del state["workers"]["0"]["stream"]
        replayed = P.SlipLoader(str(shards), cfg)
        replayed.load_state_dict(state)
        bytes_read.value = 0
        assert next(iter(replayed))["key"] == full[k]["key"]
        if k >= len(full) // 2:
            assert bytes_read.value > 2 * seek_cost, k


def test_two_workers_and_two_ranks_resume_exactly_and_cheaply(tmp_path, bytes_read):
    shards = _heavy_shards(tmp_path / "h", shards=8, per_shard=6, payload=5_000)
    for rank in (0, 1):
        cfg = _config(workers=2, rank=rank, world_size=2, epoch_samples=48, shuffle_buffer=4, shuffle_initial=4)
        full = _batches(P.SlipLoader(str(shards), cfg))
        assert len(full) == 6
        for k in (1, 3, 5):
            resumed, _ = _resume_from(str(shards), cfg, k)
            bytes_read.value = 0
            rest = _batches(resumed)
            assert [b["key"] for b in rest] == [b["key"] for b in full[k:]], (rank, k)
            for a, b in zip(rest, full[k:]):
                _same(a, b)
        # Each worker reads 2 of the rank's 4 shards per pass: a resume late in the epoch reads
        # less than what the whole epoch took.
        bytes_read.value = 0
        _batches(P.SlipLoader(str(shards), cfg))
        whole_epoch = bytes_read.value
        resumed, _ = _resume_from(str(shards), cfg, 5)
        bytes_read.value = 0
        _batches(resumed)
        assert bytes_read.value < whole_epoch / 2


def test_mixed_and_resampled_sources_resume_exactly(tmp_path):
    a = _shard_dir(tmp_path / "a", "a", shards=3, per_shard=5, index=True, corpus="cc3m")
    b = _shard_dir(tmp_path / "b", "b", shards=2, per_shard=4, index=True, corpus="cc12m")
    spec = f"{a}::0.7,{b}::0.3"
    for cfg in (_config(epoch_samples=30), _config(mode="resampled", epoch_samples=40)):
        full = _batches(P.SlipLoader(spec, cfg))
        for k in (1, len(full) // 2, len(full) - 1):
            resumed, state = _resume_from(spec, cfg, k)
            assert state["workers"]["0"]["stream"]["mix"] is not None
            rest = _batches(resumed)
            assert [x["key"] for x in rest] == [x["key"] for x in full[k:]], (cfg.mode, k)
            for x, y in zip(rest, full[k:]):
                _same(x, y)


@pytest.mark.parametrize("kind", ["pipe", "gzip"])
def test_shards_that_cannot_seek_are_replayed_exactly_with_progress_lines(tmp_path, kind, bytes_read, caplog, monkeypatch):
    monkeypatch.setattr(stages, "RESUME_PROGRESS_INTERVAL_S", 0.0)
    plain = _shard_dir(tmp_path / "s", "s", shards=3, per_shard=6)
    if kind == "pipe":
        spec = f"pipe:cat {plain}/s-{{000000..000002}}.tar"
    else:
        for tar in plain.glob("*.tar"):
            (tmp_path / "s" / (tar.name + ".gz")).write_bytes(gzip.compress(tar.read_bytes()))
        spec = f"{plain}/s-{{000000..000002}}.tar.gz"
    cfg = _config(epoch_samples=18)
    full = _batches(P.SlipLoader(spec, cfg))
    bytes_read.value = 0
    _batches(P.SlipLoader(spec, cfg))
    epoch_bytes = bytes_read.value
    resumed, _ = _resume_from(spec, cfg, 3)
    bytes_read.value = 0
    with caplog.at_level(logging.INFO, logger="slip.data"):
        rest = _batches(resumed)
    assert [x["key"] for x in rest] == [x["key"] for x in full[3:]]
    assert bytes_read.value == epoch_bytes  # replayed from the epoch's start
    assert "cannot be read from an offset" in caplog.text
    progress = [r.getMessage() for r in caplog.records if "re-read" in r.getMessage()]
    assert "resuming, re-read 1 of 12 consumed samples" in progress[1]
    assert "resumed after re-reading 12 of 12 consumed samples" in progress[-1]


def test_a_broken_shard_is_counted_once_across_a_resume(tmp_path):
    d = _shard_dir(tmp_path / "s", "s", shards=3, per_shard=6)
    raw = (d / "s-000001.tar").read_bytes()
    (d / "s-000001.tar").write_bytes(raw[: len(raw) // 2 + 100])  # cut inside a member
    cfg = _config(shuffle_buffer=4, shuffle_initial=4, shuffle_shards=False)
    loader = P.SlipLoader(str(d), cfg)
    full = _batches(loader)
    total = loader.skipped()
    assert total.get("tar_error") == 1
    for k in range(1, len(full)):
        first = P.SlipLoader(str(d), cfg)
        _batches(first, k)
        resumed = P.SlipLoader(str(d), cfg)
        resumed.load_state_dict(first.state_dict())
        rest = _batches(resumed)
        assert [x["key"] for x in rest] == [x["key"] for x in full[k:]], k
        merged = Counter(first.skipped()) + Counter(resumed.skipped())
        assert dict(merged) == total, k


def test_shard_reader_offsets_address_each_sample(tmp_path):
    long_key = "x" * 120  # a pax/GNU long name header before the member
    members = [("__meta__", b"m"), ("a.jpg", b"1"), ("a.txt", b"2"), ("a.TXT", b"dup"),
               (f"{long_key}.jpg", b"3"), ("noext", b"?"), ("c.jpg", b"4" * 3000)]
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    errors = []
    reader = tars.ReadShards(errors.append)
    samples, states = [], []
    for sample in reader([{"url": str(path)}]):
        samples.append(sample)
        states.append(reader.state())
    assert [s["__key__"] for s in samples] == ["a", long_key, "c"]
    assert samples[0]["txt"] == b"2" and len(errors) == 1 and "duplicate" in str(errors[0])
    assert states[-1]["next"] == tars.SHARD_DONE
    assert [s["__ordinal__"] for s in samples] == [0, 1, 2] and [s["ordinal"] for s in states[:-1]] == [1, 2]
    with open(path, "rb") as f:
        for sample in samples:
            again = tars.read_sample(f, str(path), sample["__offset__"], sample["__key__"])
            assert again == {k: v for k, v in sample.items() if k != "__ordinal__"}  # the ordinal is the reader's count
        assert tars.read_sample(f, str(path), samples[1]["__offset__"], "a") is None
    # A reader restored at a state continues with the samples after it.
    for i, state in enumerate(states[:-1]):
        restored = tars.ReadShards(errors.append)
        restored.restore = state
        assert [s["__key__"] for s in restored([{"url": str(path)}])] == [s["__key__"] for s in samples[i + 1:]]
