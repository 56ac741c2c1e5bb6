"""Shards written by img2dataset are read as they are."""
from __future__ import annotations

import json

import torch

from slip.data import pipeline as P

from test_data_pipeline import _config, _jpeg, _write_tar


def test_img2dataset_output_directory_is_read_as_is(tmp_path):
    # img2dataset writes {shard}.tar with {key}.jpg / .txt / .json, plus {shard}_stats.json and
    # {shard}.parquet beside it; only the tars are data.
    out = tmp_path / "img2dataset"
    out.mkdir()
    for shard in range(2):
        members = []
        for i in range(5):
            key = f"{shard:05d}{i:04d}"
            meta = {"url": f"http://example.com/{key}.jpg", "key": key, "status": "success",
                    "caption": f"caption {key}", "width": 40, "height": 32, "error_message": None}
            members += [(f"{key}.jpg", _jpeg(shard * 10 + i)), (f"{key}.txt", f"caption {key}".encode()),
                        (f"{key}.json", json.dumps(meta).encode())]
        _write_tar(out / f"{shard:05d}.tar", members)
        (out / f"{shard:05d}_stats.json").write_text(json.dumps({"count": 5, "successes": 5}))
        (out / f"{shard:05d}.parquet").write_bytes(b"PAR1 not read by the loader PAR1")
    loader = P.build_loader(str(out), _config(method="clip", batch_size=5))
    batches = list(loader)
    keys = sorted(k for b in batches for k in b["key"])
    assert keys == sorted(f"{s:05d}{i:04d}" for s in range(2) for i in range(5))
    assert all(b["image"].dtype == torch.uint8 and b["text"].shape[0] == 5 for b in batches)
    assert loader.skipped() == {}
