"""A loader restored from its state_dict continues with exactly the batches an uninterrupted
loader would have produced: same samples, same crops, same order."""
from __future__ import annotations

import pytest
import torch

from slip.data import pipeline as P

from test_data_pipeline import _config, _shard_dir


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
    for x, y in zip(a["views"], b["views"]):
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
    real = P.decode_views
    monkeypatch.setattr(P, "decode_views", lambda *a, **k: decoded.append(1) or real(*a, **k))
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
