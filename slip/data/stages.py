"""The stages of the training data pipeline as each loader worker runs them: shard order,
sample shuffle and source mixing with resumable state, caption choice, one decode into the
views, batching; and the shared skip counts. :mod:`slip.data.pipeline` assembles them."""
from __future__ import annotations

import ctypes
import json
import logging
import multiprocessing
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, default_collate
from webdataset.filters import pick

from slip.data.decode import EncodedBatch, decode_views, plan_views
from slip.data.errors import (
    BAD_METADATA,
    CAPTION_NOT_UTF8,
    EMPTY_CAPTION,
    LOAD_SKIP_REASONS,
    MISSING_CAPTION,
    MISSING_IMAGE,
    SAMPLE_ERROR,
    SHARD_UNREADABLE,
    TAR_ERROR,
    SampleSkip,
)
from slip.data.images import DEFAULT_MAX_PIXELS
from slip.data.saliency import MASK_MEMBER, SALIENCY_MODES
from slip.data.views import MethodViews
from slip.tokenizer import trim_padding

logger = logging.getLogger(__name__)

# What the loader counts, by reason (slip.data.errors: the same names as make-shards').
SKIP_REASONS = LOAD_SKIP_REASONS

# Image members recognised in a sample, in order of preference (img2dataset writes .jpg).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")

Tokenizer = Callable[[list[str]], torch.Tensor]


# --------------------------------------------------------------------------------------------
# Skip accounting
# --------------------------------------------------------------------------------------------
class SkipCounter:
    """Counts skipped samples by reason, shared by every process of one loader.

    The counts live in shared memory created in the parent process, so DataLoader workers
    (forked or spawned with the dataset) add to the same totals and the trainer can read them
    at any time, also after the workers have exited.

    Args:
        reasons: the reason names; anything else is counted as ``sample_error``.
        log_every: additionally log the totals after this many skips seen by one process.
    """

    def __init__(self, reasons: Sequence[str] = SKIP_REASONS, log_every: int = 1000) -> None:
        self.reasons = tuple(reasons)
        self._index = {r: i for i, r in enumerate(self.reasons)}
        self._counts = multiprocessing.Array(ctypes.c_int64, len(self.reasons))
        self.log_every = log_every
        self._logged: set[str] = set()
        self._local = 0

    def add(self, reason: str, detail: str = "", key: str = "") -> None:
        """Count one skip; the first of each reason in this process is logged with ``detail``."""
        if reason not in self._index:
            detail = f"{reason}: {detail}"
            reason = SAMPLE_ERROR if SAMPLE_ERROR in self._index else self.reasons[-1]
        with self._counts.get_lock():
            self._counts[self._index[reason]] += 1
        self._local += 1
        where = f"sample {key}" if key else "shard data"
        if reason not in self._logged:
            self._logged.add(reason)
            logger.warning("skipped %s: %s %s (further ones are counted)", where, reason, detail)
        else:
            logger.debug("skipped %s: %s %s", where, reason, detail)
        if self.log_every and self._local % self.log_every == 0:
            logger.info("skipped samples so far: %s", self.counts())

    def counts(self) -> dict[str, int]:
        """Non-zero counts by reason, summed over all processes."""
        with self._counts.get_lock():
            values = list(self._counts)
        return {r: int(v) for r, v in zip(self.reasons, values) if v}

    def total(self) -> int:
        """Total number of skips over all processes."""
        return sum(self.counts().values())

    def reset(self) -> None:
        """Zero all counts (e.g. between benchmark phases)."""
        with self._counts.get_lock():
            for i in range(len(self.reasons)):
                self._counts[i] = 0


class TarErrorHandler:
    """Error handler of the shard reading (:class:`slip.data.tars.ReadShards`, also usable as a
    webdataset handler): count and log the error, then carry on. A shard that cannot be opened
    counts as ``shard_unreadable``, any other reading error as ``tar_error``; the reader skips
    the failing member or, for errors while reading the tar stream, the rest of that shard.
    """

    def __init__(self, counter: SkipCounter) -> None:
        self.counter = counter

    def __call__(self, exn: BaseException) -> bool:
        if isinstance(exn, (FileNotFoundError, PermissionError, IsADirectoryError)):
            reason = SHARD_UNREADABLE
        else:
            reason = TAR_ERROR
        self.counter.add(reason, f"{type(exn).__name__}: {str(exn)[:300]}")
        return True


# --------------------------------------------------------------------------------------------
# Ranks, workers, epochs, seeds
# --------------------------------------------------------------------------------------------
def resolve_rank_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size): explicit values, else torch.distributed, else RANK/WORLD_SIZE, else 0/1."""
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise ValueError("give both rank and world_size, or neither")
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    else:
        rank, world_size = 0, 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    return rank, world_size


def worker_id() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class SharedEpoch:
    """The current epoch in shared memory, so workers see :meth:`SlipLoader.set_epoch` even
    when they are persistent (a plain attribute would be frozen into their copy)."""

    def __init__(self, epoch: int = 0) -> None:
        self._value = multiprocessing.Value(ctypes.c_int64, epoch)

    def set(self, epoch: int) -> None:
        self._value.value = epoch

    def get(self) -> int:
        return int(self._value.value)


def _rng(*parts: object) -> random.Random:
    # String seeds are hashed with SHA-512 by random.Random: stable across runs and processes.
    return random.Random("slip:" + ":".join(map(str, parts)))


class WorkerSeed:
    """``worker_seed`` for webdataset's ResampledShards: distinct per rank, worker and epoch."""

    def __init__(self, seed: int, rank: int, epoch: SharedEpoch) -> None:
        self.seed, self.rank, self.epoch = seed, rank, epoch

    def __call__(self) -> int:
        worker, _ = worker_id()
        return _rng(self.seed, "shards", self.epoch.get(), self.rank, worker).getrandbits(63)


class EpochShards(IterableDataset):
    """This rank's shards for the current epoch, as ``{"url": ...}`` dicts.

    All ranks shuffle the full list with the same (seed, epoch) seed and keep every
    ``world``-th shard starting at ``rank``, so the ranks' shares partition the list. (Used
    instead of webdataset's ``split_by_node``, which can only read the rank from the
    environment, with ``RANK`` taking precedence over ``torch.distributed``.)
    """

    def __init__(self, urls: Sequence[str], rank: int, world_size: int, seed: int, epoch: SharedEpoch, shuffle: bool = True) -> None:
        super().__init__()
        self.urls = list(urls)
        self.rank, self.world_size = rank, world_size
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle

    def __iter__(self) -> Iterator[dict[str, str]]:
        urls = list(self.urls)
        if self.shuffle:
            _rng(self.seed, "epoch-shards", self.epoch.get()).shuffle(urls)
        for url in urls[self.rank :: self.world_size]:
            yield {"url": url}


class PassShuffle:
    """Reorders a worker's shards on each repeated pass within an epoch (``epoch_samples``
    makes a worker cycle over its shards); the first pass keeps the epoch's order."""

    def __init__(self, seed: int, rank: int, epoch: SharedEpoch) -> None:
        self.seed, self.rank, self.epoch = seed, rank, epoch
        self._passes = 0

    def __call__(self, src: Iterable[dict[str, str]]) -> Iterator[dict[str, str]]:
        shards = list(src)
        worker, _ = worker_id()
        if not shards:
            logger.warning("rank %d worker %d has no shards (fewer shards than ranks x workers)", self.rank, worker)
        if self._passes:
            _rng(self.seed, "pass", self.epoch.get(), self.rank, worker, self._passes).shuffle(shards)
        self._passes += 1
        yield from shards


def _rng_state(rng: random.Random) -> list[Any]:
    """A ``random.Random``'s state as plain lists (checkpoints are loaded with weights_only)."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _rng_from_state(state: Sequence[Any]) -> random.Random:
    rng = random.Random()
    rng.setstate((int(state[0]), tuple(int(v) for v in state[1]), state[2]))
    return rng


class SampleShuffle:
    """A shuffle buffer with an RNG seeded per rank, worker, epoch and pass (webdataset's
    stock stage would give every worker the same seed), with webdataset's algorithm: until the
    buffer holds ``bufsize`` samples it takes two for each one it releases, it releases once it
    holds ``initial``, and it drains at the end of the stream.

    State (:meth:`state`): where each buffered sample lives and what it is (``[url, offset, key,
    corpus, ordinal, index]``: its shard, byte offset and key, its corpus tag, its ordinal in the
    shard and its global index, None when unnumbered) and the RNG state. ``restore`` = (buffered
    samples, RNG state) makes the next pass start from them.
    """

    def __init__(self, bufsize: int, initial: int, seed: int, rank: int, epoch: SharedEpoch) -> None:
        self.bufsize, self.initial = bufsize, initial
        self.seed, self.rank, self.epoch = seed, rank, epoch
        self._passes = 0
        self.buffer: list[dict[str, Any]] = []
        self.rng = random.Random()
        self.restore: tuple[list[dict[str, Any]], Sequence[Any]] | None = None

    def state(self) -> dict[str, Any]:
        refs = [[s["__url__"], s.get("__offset__"), s["__key__"], s.get("__corpus__"), s.get("__ordinal__"),
                 s.get("__index__")] for s in self.buffer]
        return {"rng": _rng_state(self.rng), "buffer": refs}

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        worker, _ = worker_id()
        restore, self.restore = self.restore, None
        if restore is not None:
            self.buffer, self.rng = list(restore[0]), _rng_from_state(restore[1])
        else:
            self.buffer, self.rng = [], _rng(self.seed, "samples", self.epoch.get(), self.rank, worker, self._passes)
        self._passes += 1
        return self._shuffled(iter(src), self.buffer, self.rng)

    def _shuffled(self, src: Iterator[dict[str, Any]], buf: list[dict[str, Any]], rng: random.Random) -> Iterator[dict[str, Any]]:
        initial = min(self.initial, self.bufsize)
        for sample in src:
            buf.append(sample)
            if len(buf) < self.bufsize:
                extra = next(src, None)
                if extra is not None:
                    buf.append(extra)
            if len(buf) >= initial:
                yield pick(buf, rng)
        while buf:
            yield pick(buf, rng)


class TagCorpus:
    def __init__(self, corpus: str | None) -> None:
        self.corpus = corpus

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        sample["__corpus__"] = self.corpus
        return sample


class WeightedMix(IterableDataset):
    """Interleave sample streams, drawing the next sample's source with probability
    proportional to its weight; an exhausted source drops out (epoch mode) and the mix ends
    when all are exhausted.

    State (:meth:`state`): the RNG state and the sources still live; ``restore`` (such a state)
    makes the next pass start from it. Each stream's pass begins (its stages are called) when
    the mix's pass begins, so the streams' stage states always belong to the current pass.
    """

    def __init__(self, streams: Sequence[wds.DataPipeline], weights: Sequence[float], seed: int, rank: int, epoch: SharedEpoch) -> None:
        super().__init__()
        self.streams, self.weights = list(streams), [float(w) for w in weights]
        self.seed, self.rank, self.epoch = seed, rank, epoch
        self._passes = 0
        self.rng = random.Random()
        self.live: list[int] = []
        self.restore: Mapping[str, Any] | None = None

    def state(self) -> dict[str, Any]:
        return {"rng": _rng_state(self.rng), "live": list(self.live)}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, _ = worker_id()
        restore, self.restore = self.restore, None
        if restore is not None:
            self.rng, self.live = _rng_from_state(restore["rng"]), [int(i) for i in restore["live"]]
        else:
            self.rng = _rng(self.seed, "mix", self.epoch.get(), self.rank, worker, self._passes)
            self.live = list(range(len(self.streams)))
        self._passes += 1
        return self._mixed(self.rng, self.live, {i: self.streams[i].iterator1() for i in self.live})

    def _mixed(self, rng: random.Random, live: list[int], iterators: dict[int, Iterator[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
        while live:
            k = rng.choices(range(len(live)), weights=[self.weights[i] for i in live])[0]
            try:
                yield next(iterators[live[k]])
            except StopIteration:
                del live[k]


# --------------------------------------------------------------------------------------------
# Per-sample processing: caption choice, one decode, crops
# --------------------------------------------------------------------------------------------
def _decode_text(raw: bytes | str, what: str) -> str:
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SampleSkip(CAPTION_NOT_UTF8, f"{what}: {exc}") from None


def _non_empty_strings(values: Iterable[Any]) -> list[str]:
    return [v.strip() for v in values if isinstance(v, str) and v.strip()]


def choose_caption(sample: Mapping[str, Any], rng: random.Random, corpus: str | None = None) -> str:
    """Pick the training caption of a raw webdataset sample.

    Rules, in order:

    1. ``json["captions"]`` (multi-caption samples): one non-empty entry at random.
    2. YFCC (``corpus == "yfcc15m"`` or the JSON has ``title``/``description``): the title or
       the description at random among those that are non-empty, as SLIP does.
    3. The ``.txt`` member.
    4. ``json["caption"]`` (img2dataset's metadata) when there is no ``.txt``.

    Raises:
        SampleSkip: ``bad_metadata`` (unparsable JSON), ``caption_not_utf8``,
            ``empty_caption`` or ``missing_caption``.
    """
    meta: Mapping[str, Any] = {}
    if sample.get("json") is not None:
        try:
            parsed = json.loads(_decode_text(sample["json"], "json"))
        except SampleSkip:
            raise SampleSkip(BAD_METADATA, "json is not UTF-8") from None
        except ValueError as exc:
            raise SampleSkip(BAD_METADATA, f"json: {exc}") from None
        if not isinstance(parsed, dict):
            raise SampleSkip(BAD_METADATA, f"json is a {type(parsed).__name__}, not an object")
        meta = parsed
    captions = meta.get("captions")
    if isinstance(captions, list):
        options = _non_empty_strings(captions)
        if options:
            return rng.choice(options)
    if corpus == "yfcc15m" or "title" in meta or "description" in meta:
        options = _non_empty_strings((meta.get("title"), meta.get("description")))
        if options:
            return rng.choice(options)
    if sample.get("txt") is not None:
        text = _decode_text(sample["txt"], "txt").strip()
        if not text:
            raise SampleSkip(EMPTY_CAPTION)
        return text
    fallback = meta.get("caption")
    if isinstance(fallback, str):
        if not fallback.strip():
            raise SampleSkip(EMPTY_CAPTION)
        return fallback.strip()
    raise SampleSkip(MISSING_CAPTION)


def _image_bytes(sample: Mapping[str, Any]) -> bytes:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    raise SampleSkip(MISSING_IMAGE, f"members: {sorted(k for k in sample if not k.startswith('__'))}")


RESUME_PROGRESS_INTERVAL_S = 10.0  # how often a resume's re-reading of consumed samples reports


class _ReplayProgress:
    """Progress lines while a resumed worker re-reads (without decoding) the samples it had
    consumed before the checkpoint: late in a long epoch this takes minutes and would
    otherwise look like a hang."""

    def __init__(self, rank: int, worker: int, pass_no: int, resume_after: tuple[int, int]) -> None:
        self.who = f"rank {rank} worker {worker}"
        # The last pass before the checkpoint ends at a known index; earlier ones are read whole.
        self.target = resume_after[1] if pass_no == resume_after[0] else None
        self.pass_no = pass_no
        self.done = 0
        self.start = self.last = time.monotonic()

    def _line(self) -> str:
        done = self.done
        elapsed = time.monotonic() - self.start
        rate = done / max(elapsed, 1e-9)
        if self.target is None:
            return f"{self.who}: resuming, re-read {done} consumed samples of pass {self.pass_no} ({rate:.0f}/s)"
        eta = (self.target - done) / max(rate, 1e-9)
        return (f"{self.who}: resuming, re-read {done} of {self.target} consumed samples ({rate:.0f}/s, "
                f"ETA {eta:.0f} s)")

    def advance(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        if now - self.last >= RESUME_PROGRESS_INTERVAL_S:
            self.last = now
            logger.info(self._line())

    def finish(self) -> None:
        """Report the end of the re-reading; returns None (the caller drops its progress)."""
        logger.info(self._line().replace("resuming, re-read", "resumed after re-reading"))


DECODE_MODES = ("workers", "device")


class DecodeSamples:
    """Pipeline stage: raw samples -> ``{"key", "index", "caption", "views"}`` with uint8 crops
    (``decode`` ``workers``), or ``{"key", "index", "caption", "planned"}`` with the JPEG's bytes
    and its crop boxes for the training device to decode (``device``,
    :func:`~slip.data.decode.plan_views`); ``index`` is the sample's global index (None when the
    shards are not numbered); bad samples are counted in ``counter`` and dropped."""

    def __init__(
        self,
        views: MethodViews,
        counter: SkipCounter,
        *,
        seed: int,
        rank: int,
        epoch: SharedEpoch,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        allow_draft: bool = True,
        corpus: str | None = None,
        resampled: bool = False,
        decode: str = "workers",
        saliency: str = "auto",
    ) -> None:
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
        if saliency not in SALIENCY_MODES:
            raise ValueError(f"saliency must be one of {', '.join(SALIENCY_MODES)}, got {saliency!r}")
        self.views, self.counter, self.decode, self.saliency = views, counter, decode, saliency
        self.resampled = resampled
        self.seed, self.rank, self.epoch = seed, rank, epoch
        self.max_pixels, self.allow_draft, self.corpus = max_pixels, allow_draft, corpus
        self._passes = 0
        # Resuming by replay: (pass, index) of the last consumed sample; the stream is read again
        # from the epoch's start and the samples up to there are passed over without decoding.
        self.resume_after: tuple[int, int] | None = None
        # Resuming from restored stage states: (pass, index) the restored pass continues after.
        self.continue_after: tuple[int, int] | None = None

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        worker, _ = worker_id()
        pass_no = self._passes
        self._passes += 1
        # Resuming: samples up to this (pass, index) were consumed before the checkpoint. They
        # still flow through the shard reading and shuffle stages (whose state depends on
        # them) but are not decoded.
        resume_after = tuple(self.resume_after) if self.resume_after is not None else (-1, 0)
        progress = _ReplayProgress(self.rank, worker, pass_no, resume_after) if pass_no <= resume_after[0] else None
        first = 1
        if self.continue_after is not None and self.continue_after[0] == pass_no:
            first = self.continue_after[1] + 1
            self.continue_after = None
        specs = self.views.all
        for index, sample in enumerate(src, start=first):
            if (pass_no, index) <= resume_after:
                progress.advance(index)
                continue
            if progress is not None:
                progress = progress.finish()
            key = str(sample.get("__key__", "?"))
            # One RNG per sample, keyed by the sample itself (shard and key): a resumed run draws
            # the same crops and captions without replaying earlier samples, and the draws do not
            # depend on how shards are split over ranks and workers. Resampled shards can repeat
            # within a pass, so there the stream position is part of the key too.
            # The shard's file name, not its path: moving a corpus must not change its augmentations.
            where = (self.rank, worker, index) if self.resampled else ()
            shard = os.path.basename(str(sample.get("__url__", "")))
            rng = _rng(self.seed, "views", self.epoch.get(), sample.get("__corpus__"), shard, key, pass_no, *where)
            try:
                caption = None
                if self.views.needs_text:
                    caption = choose_caption(sample, rng, self.corpus or sample.get("__corpus__"))
                make = plan_views if self.decode == "device" else decode_views
                made = make(_image_bytes(sample), specs, rng, max_pixels=self.max_pixels, allow_draft=self.allow_draft,
                            mask_data=sample.get(MASK_MEMBER), saliency=self.saliency)
                mask = None if self.views.mask is None else self.views.mask(rng).reshape(-1)
            except SampleSkip as skip:
                self.counter.add(skip.reason, skip.detail, key)
                continue
            except Exception as exc:  # noqa: BLE001 -- bad data must never stop training
                self.counter.add(SAMPLE_ERROR, f"{type(exc).__name__}: {exc}", key)
                logger.debug("unexpected error on sample %s", key, exc_info=True)
                continue
            images = "planned" if self.decode == "device" else "views"
            yield {"key": key, "index": sample.get("__index__"), "caption": caption, images: made, "mask": mask,
                   "position": (pass_no, index)}


class Batches:
    """Pipeline stage: samples -> collated batches of ``size`` (the last one smaller when
    ``partial``). A batch is handed on as soon as it is full (webdataset's ``batched`` waits for
    the next sample), so when it is, every stage before stands right after its last sample:
    the position a resumed stream restarts from."""

    def __init__(self, size: int, collate: Callable[[list[dict[str, Any]]], dict[str, Any]], partial: bool) -> None:
        self.size, self.collate, self.partial = size, collate, partial

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        batch: list[dict[str, Any]] = []
        for sample in src:
            batch.append(sample)
            if len(batch) == self.size:
                yield self.collate(batch)
                batch = []
        if batch and self.partial:
            yield self.collate(batch)


def stack_views(crops: list[torch.Tensor]) -> torch.Tensor:
    """Stack ``(3, h, w)`` crops into an ``(N, 3, h, w)`` batch with channels-last memory
    (``torch.channels_last``), the layout the workers' crops already have, so each crop is one
    plain copy (a planar batch would transpose every pixel, about 50 us per 224 px crop on one
    core). In a DataLoader worker the batch is written straight into shared memory, as
    ``default_collate`` does. The values are those of ``torch.stack(crops)``."""
    return default_collate([c.permute(1, 2, 0) for c in crops]).permute(0, 3, 1, 2)


class Collate:
    """Stack decoded samples into a batch dict and tokenise the captions in one call (stacked
    straight into shared memory in a DataLoader worker, as torch's ``default_collate`` does, so
    that handing the batch to the training process copies nothing); samples
    planned for decoding on the training device become the batch's ``encoded`` entry
    (:class:`~slip.data.decode.EncodedBatch`) instead of ``image`` and ``views``. The samples'
    global indices become ``index``, an int64 tensor, when the shards are numbered (all samples
    of a pipeline are, or none)."""

    def __init__(self, views: MethodViews, tokenizer: Tokenizer | None) -> None:
        self.views, self.tokenizer = views, tokenizer

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {"key": [s["key"] for s in samples], "__position__": samples[-1]["position"]}
        if samples[0].get("index") is not None:
            batch["index"] = torch.tensor([s["index"] for s in samples], dtype=torch.long)
        offset = 0
        if "planned" in samples[0]:
            batch["encoded"] = EncodedBatch.collate([s["planned"] for s in samples])
        elif self.views.clip is not None:
            batch["image"] = stack_views([s["views"][0] for s in samples])
            offset = 1
        if self.views.ssl and "encoded" not in batch:
            batch["views"] = [
                stack_views([s["views"][offset + i] for s in samples]) for i in range(len(self.views.ssl))
            ]
        if self.views.mask is not None:
            batch["patch_mask"] = default_collate([s["mask"] for s in samples])
        if self.views.needs_text and self.tokenizer is not None:
            batch["text"] = trim_padding(self.tokenizer([s["caption"] for s in samples]).long())
        return batch


