"""Tests of slip.ssl.masking: BEiT blockwise masks -- counts, block geometry, determinism."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from slip.ssl.masking import BlockMaskGenerator, sample_masks


def test_target_counts() -> None:
    # int(0.4 * 196) = 78; BEiT's released setting is 75 of 196.
    assert BlockMaskGenerator().num_masked == 78
    assert BlockMaskGenerator(num_masked=75).num_masked == 75
    assert BlockMaskGenerator(grid=(10, 10), mask_ratio=0.29).num_masked == 29  # not 28 from 28.999...
    assert BlockMaskGenerator(grid=7, mask_ratio=0.5).grid == (7, 7)
    with pytest.raises(ValueError):
        BlockMaskGenerator(mask_ratio=0.0)
    with pytest.raises(ValueError):
        BlockMaskGenerator(min_aspect=2.0, max_aspect=1.0)


@pytest.mark.parametrize("num_masked", [None, 75])
def test_mask_statistics(num_masked: int | None) -> None:
    gen = BlockMaskGenerator(num_masked=num_masked)
    masks = gen.sample_masks(800, np.random.default_rng(0))
    assert masks.shape == (800, 196) and masks.dtype == torch.bool
    counts = masks.sum(dim=1).float()
    assert int(counts.max()) <= gen.num_masked
    # Blocks overshoot the remainder often enough that some masks stop short, but on average the
    # ratio is within 2 points of the target, and most masks hit it exactly.
    assert abs(counts.mean().item() / 196 - gen.mask_ratio) < 0.02
    assert (counts == gen.num_masked).float().mean() > 0.4
    # Masks are blocky: far fewer horizontal mask/no-mask transitions than independent masking.
    grid = masks.reshape(-1, 14, 14)
    edges = (grid[:, :, 1:] != grid[:, :, :-1]).float().sum(dim=(1, 2)).mean().item()
    p = gen.mask_ratio
    assert edges < 0.5 * (2 * p * (1 - p) * 14 * 13)


def test_block_geometry() -> None:
    gen = BlockMaskGenerator(grid=(14, 14), mask_ratio=0.4, min_block=16, min_aspect=0.3)
    rng = np.random.default_rng(1)
    saw_small_remainder = False
    for _ in range(300):
        mask, blocks = gen.generate(rng)
        rebuilt = np.zeros_like(mask)
        total = 0
        for b in blocks:
            lo, hi = sorted((gen.min_block, b.cap))
            if b.cap >= gen.min_block:
                assert b.area >= gen.min_block  # the block was drawn at least min_block large
            else:
                saw_small_remainder = True  # BEiT's swapped interval for the last few patches
            assert lo <= b.area <= hi and b.cap <= gen.max_block
            assert gen.min_aspect <= b.aspect <= gen.max_aspect
            assert b.height == round(math.sqrt(b.area * b.aspect))
            assert b.width == round(math.sqrt(b.area / b.aspect))
            # BEiT's fit rule: strictly smaller than the grid.
            assert 0 <= b.top and b.top + b.height <= 14 and b.height < 14
            assert 0 <= b.left and b.left + b.width <= 14 and b.width < 14
            assert 1 <= b.added <= b.cap
            newly = ~rebuilt[b.top : b.top + b.height, b.left : b.left + b.width]
            assert int(newly.sum()) == b.added
            rebuilt[b.top : b.top + b.height, b.left : b.left + b.width] = True
            total += b.added
        assert np.array_equal(rebuilt, mask)
        assert total == int(mask.sum()) <= gen.num_masked
    assert saw_small_remainder


def test_max_block_and_full_span() -> None:
    gen = BlockMaskGenerator(grid=(14, 14), mask_ratio=0.5, min_block=4, max_block=20)
    for seed in range(50):
        _, blocks = gen.generate(seed)
        assert blocks and all(b.cap <= 20 and b.area <= 20 for b in blocks)
    # On a 2 x 2 grid BEiT's strict rule allows only 1 x 1 blocks; full_span allows 2-wide ones.
    strict = BlockMaskGenerator(grid=(2, 2), num_masked=2, min_block=2, min_aspect=0.5)
    full = BlockMaskGenerator(grid=(2, 2), num_masked=2, min_block=2, min_aspect=0.5, full_span=True)
    rng_a, rng_b = np.random.default_rng(0), np.random.default_rng(0)
    strict_sizes = {(b.height, b.width) for s in range(100) for b in strict.generate(rng_a)[1]}
    full_sizes = {(b.height, b.width) for s in range(100) for b in full.generate(rng_b)[1]}
    assert strict_sizes <= {(1, 1)}
    assert full_sizes & {(1, 2), (2, 1)}


def test_determinism_and_rng_types() -> None:
    gen = BlockMaskGenerator()
    a = gen.sample_masks(16, 123)
    b = gen.sample_masks(16, 123)
    assert torch.equal(a, b)
    assert not torch.equal(a, gen.sample_masks(16, 124))
    # One stream per batch: the masks of a batch differ from each other.
    assert len({tuple(m.tolist()) for m in a}) > 8
    for make in (lambda: np.random.default_rng(5), lambda: torch.Generator().manual_seed(5), lambda: random.Random(5)):
        first, second = gen(make()), gen(make())
        assert first.shape == (14, 14) and first.dtype == torch.bool
        assert torch.equal(first, second)
    assert torch.equal(sample_masks(4, 9), BlockMaskGenerator().sample_masks(4, 9))
    with pytest.raises(TypeError):
        gen("seed")  # type: ignore[arg-type]
