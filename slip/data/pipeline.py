"""Streaming training data for SLIP: shard specs -> webdataset pipeline -> uint8 view batches.

Typical use by a trainer::

    from slip.data.pipeline import PipelineConfig, build_loader
    from slip.data.augment import BatchAugment

    loader = build_loader("data/yfcc15m/", PipelineConfig(method="slip-simclr", batch_size=256,
                                                          workers=8, mode="resampled",
                                                          epoch_samples=15_000_000))
    augment = BatchAugment(loader.views).to(device)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            batch = augment(to_device(batch))   # float, normalised views
            ...
    print(loader.skipped())                     # {"truncated_image": 12, ...}

Batch layout (every entry has the batch size B as its first dimension):

* ``image``: ``(B, 3, H, W)`` uint8, the CLIP view (absent for method ``simclr``);
* ``views``: a list of ``(B, 3, H, W)`` uint8 tensors, one per SSL view (two for SimCLR; absent
  for method ``clip``). A list rather than one stacked tensor so views may differ in size.
  Decoded in the workers, ``image`` and ``views`` are channels-last in memory
  (``torch.channels_last``, as the crops are made; :func:`slip.data.stages.stack_views`);
  :class:`~slip.data.augment.BatchAugment` returns planar float views;
* ``text``: ``(B, L)`` int64 token ids, cut after the batch's last end-of-text token to L <= 77, a
  multiple of 8 (:func:`slip.tokenizer.trim_padding`; absent when the method has no image-text loss); long
  captions truncated as ``PipelineConfig.text_truncation`` says (:func:`slip.tokenizer.get_tokenizer`);
* ``patch_mask``: ``(B, H * W)`` bool, the views' blockwise patch mask (only when the views
  declare one, e.g. BEiT's); drawn per sample from the sample's own RNG;
* ``key``: list of B sample keys (strings);
* ``index``: ``(B,)`` int64, each sample's global index in the corpus (see "Sample indices";
  absent when a source of the spec has no ``index.json`` with sample counts).

:class:`~slip.data.augment.BatchAugment` turns ``image`` and ``views`` into normalised float.

Shard specs (:func:`parse_shard_spec`)
--------------------------------------
A spec names one or more *sources*, each optionally weighted::

    SPEC   := SOURCE ["::" WEIGHT] ("," SOURCE ["::" WEIGHT])*
    SOURCE := brace pattern      cc12m/{00000..01242}.tar
            | directory          cc3m/          (its index.json if present, else all *.tar, sorted)
            | index file         cc3m/index.json

Commas inside braces belong to the brace pattern. A Python list of strings or of
``(spec, weight)`` pairs is accepted too. Weights are relative (normalised to sum 1). Example:
``"yfcc/{000000..001499}.tar::0.7,cc12m/::0.3"``.

Modes
-----
* ``epoch``: every sample once per epoch across all ranks. The shard list (of each source) is
  shuffled with a seed shared by all ranks (``seed``, epoch), split across ranks (shard ``i`` to
  rank ``i % world``) and then across each rank's DataLoader workers (webdataset's
  ``split_by_worker``). Shards are the unit of splitting, so when the number of shards is not a
  multiple of ``world * workers`` some workers (and ranks) get one shard more than others and
  ranks yield different numbers of batches; a worker without shards yields nothing (logged).
  Every sample is still seen exactly once, but DDP needs equal step counts: set
  ``epoch_samples`` and every worker yields exactly ``ceil(epoch_samples / (world * B * W))``
  batches, cycling over its own shards (then a sample may be seen twice or not at all within an
  epoch -- the price of equal steps). With several weighted sources, epoch mode interleaves them
  at the given rates until each is exhausted (weights only change the mixing order).
* ``resampled``: infinite; each worker draws shards with replacement (webdataset's
  ``ResampledShards``), seeded by (seed, rank, worker, epoch), and sources are mixed at exactly
  their weights. Use ``epoch_samples`` to define an epoch. The mode for many nodes and for
  weighted corpora.

Ranks come from ``rank``/``world_size`` when given, else ``torch.distributed`` when initialised,
else the ``RANK``/``WORLD_SIZE`` environment variables, else 0/1 (:func:`resolve_rank_world`).

Sample indices
--------------
Methods that keep one entry per sample of the corpus (PIRL's memory bank) need a number for each
sample that is the same on every rank, for any number of ranks and workers, in every epoch and
after any resume. A source whose shards have an ``index.json`` (``slip make-shards`` writes it:
the shards with their sample counts) numbers its samples: a sample's index is

    (the sample counts of the shards the index lists before its shard)
    + (its ordinal in its shard: the sample groups before it in the tar, in file order).

Every sample group counts, also one later skipped as a bad image or caption, so a skipped sample
never shifts the others (its index is just never seen). In a spec of several sources each later
source's indices are offset by the totals of the sources before it, in the order the spec lists
them; every index lies in ``range(SlipLoader.sample_index.size)``. A brace pattern over shards of
one folder whose ``index.json`` lists them all is numbered by that index (the whole index's
numbering, so a subset keeps the corpus's numbers); the index of remote shards (``pipe:``, HTTP)
is an ``index.json`` listing their URLs, given as the spec.

When a source has no such index (a folder or pattern without ``index.json``, an index without
sample counts, a pattern the index does not cover) the batches have no ``index`` entry at all --
never a made-up number -- and :meth:`SlipLoader.require_sample_index` raises a
:class:`~slip.data.specs.SampleIndexError` naming each such source and the ``index.json`` it
lacks; a method that needs indices calls it when it starts. A shard that holds more samples than
its index says ends at the indexed count (the rest would take the next shard's numbers), counted
once as ``tar_error`` with a message saying so: the index is stale, rebuild it.

Resume
------
:meth:`SlipLoader.state_dict` is an exact position in the epoch; a loader given it by
:meth:`SlipLoader.load_state_dict` yields the same remaining batches as an uninterrupted run
(same samples, crops and order, any ranks and workers). Each worker seeks back to the samples
its shuffle buffer held and continues its shard at the saved byte offset, so a resume reads
one buffer plus the rest of one shard per worker, wherever it falls in the epoch. Shards that
cannot be read from an offset (``pipe:`` and HTTP sources, compressed tars) are read again from
the epoch's start instead, consumed samples undecoded, with a log line saying why. The state
says which samples its positions are (each shard position and buffered sample carries its
ordinal in its shard and its global index), so the resumed batches carry the same ``index``; a
state of an older slip, which does not, is replayed the same way when the batches have indices.

Bad input
---------
Nothing in the data stops training. Each bad sample is skipped and counted by reason in a
:class:`SkipCounter` shared by all DataLoader workers (shared memory): bad images (empty,
not an image, corrupt, truncated, over ``max_pixels`` -- checked from the header before any
decode), missing/empty/non-UTF-8 captions, unparsable JSON, unreadable shards and corrupt or
truncated tars (the exception handler logs, counts and moves to the next shard; ``tar_error``
counts shards whose reading failed, one each, not samples -- the samples in the unreadable
remainder of a shard cannot be counted). Seekable uncompressed shards are read by slip's own
tar parser (:mod:`slip.data.tars`), which counts a header cut short or failing its checksum
anywhere in the shard; compressed and streamed shards go through Python's tarfile, which ends
quietly at such a header after the first member, so a tar cut there reads as a shorter archive.
Images in other modes (CMYK, palette, alpha, 16-bit) are converted, not skipped. The first
skip of each reason in each process is logged with its detail; totals are logged every
``log_interval_s`` by the loader and are available from :meth:`SlipLoader.skipped`.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from slip.data.decode import DeviceDecoder
from slip.data.degrade import DegradeImages, KeepSubset
from slip.data.errors import TAR_ERROR
from slip.data.images import DEFAULT_MAX_PIXELS
from slip.data.specs import (
    SampleIndex,
    SampleIndexError,
    ShardSource,
    ShardSpecError,
    SpecLike,
    parse_shard_spec,
    require_sample_index,
    sample_index,
)
from slip.data.stages import (
    IMAGE_EXTENSIONS,
    SKIP_REASONS,
    Batches,
    Collate,
    DecodeSamples,
    EpochShards,
    PassShuffle,
    SampleShuffle,
    SharedEpoch,
    SkipCounter,
    TagCorpus,
    TarErrorHandler,
    Tokenizer,
    WeightedMix,
    WorkerSeed,
    choose_caption,
    resolve_rank_world,
    worker_id,
)
from slip.data.tars import SHARD_DONE, ReadShards, fetch_samples
from slip.data.views import MethodViews
from slip.ssl import method_views

logger = logging.getLogger(__name__)

# Re-exported: the loader's public vocabulary lives here, its parts in slip.data.specs/stages.
__all__ = [
    "IMAGE_EXTENSIONS", "SKIP_REASONS", "PipelineConfig", "SampleIndex", "SampleIndexError", "ShardSource",
    "ShardSpecError", "SharedEpoch", "SkipCounter", "SlipLoader", "SpecLike", "build_dataset", "build_loader",
    "choose_caption", "default_tokenizer", "parse_shard_spec", "resolve_rank_world",
]


# --------------------------------------------------------------------------------------------
# Assembly
# --------------------------------------------------------------------------------------------
@dataclass
class PipelineConfig:
    """Options of the training data pipeline (see the module docstring for the semantics).

    Attributes:
        method: a name of :func:`slip.ssl.view_method_names` (``clip``, ``simclr``,
            ``slip-simclr``, ``slip-beit`` ...); selects the views (see :func:`slip.ssl.method_views`).
        size: output size of every view (int or (height, width)).
        views: explicit view declaration; overrides ``method``/``size``.
        batch_size: samples per batch (per rank).
        mode: ``epoch`` or ``resampled``.
        epoch_samples: samples per epoch over all ranks; fixes the number of batches per worker
            (required for equal steps across ranks; None = one pass in epoch mode, endless in
            resampled mode).
        shuffle_buffer: samples in each worker's shuffle buffer (0 disables shuffling).
        shuffle_initial: samples buffered before the first one is released.
        shuffle_shards: shuffle the shard order per epoch (epoch mode).
        seed: base seed of every random choice in the pipeline.
        workers: DataLoader worker processes (0 = in the calling process).
        rank, world_size: override the distributed rank/world (see :func:`resolve_rank_world`).
        partial_batches: keep each worker's last, smaller batch (no sample lost in epoch mode).
        max_pixels: images with more pixels are skipped unread (decompression-bomb cap).
        allow_draft: decode JPEGs at reduced size when every crop keeps its resolution.
        saliency: where the foreground of saliency-masked views comes from
            (:mod:`slip.data.saliency`): ``auto``, the sample's ``mask.png`` when it has one and
            an estimate otherwise, or ``estimate``, always the estimate.
        corpus: force the caption rules of a corpus (``yfcc15m``); default: from the index.
        pin_memory: pin batches for fast host-to-device copies; None = when CUDA is available.
        prefetch_factor: batches prefetched per worker.
        persistent_workers: keep workers alive between epochs.
        log_interval_s: how often the loader logs skip totals while iterating.
        text_truncation: how captions longer than the context are cut (``keep_eot`` or ``slip``,
            see :func:`slip.tokenizer.get_tokenizer`); used when no ``tokenizer`` is passed.
        decode: where images are decoded: ``workers`` (the loader's batches hold uint8
            ``image``/``views``) or ``device`` (JPEGs reach the training device undecoded, with
            their crop boxes, in the batch's ``encoded`` entry; :class:`slip.data.decode.DeviceDecoder`
            decodes them there, other images are decoded in the workers).
        subset: keep only the samples whose key hashes below this fraction of (0, 1], before the
            shuffle buffer: nested subsets, the same in every run (:mod:`slip.data.degrade`);
            the dropped samples are not skips. None keeps every sample.
        degrade: corrupt every image before its decode, the same way per sample key and ``seed``
            (``downsample:K``, ``jpeg:Q``, ``saltpepper:P``, joined by ``+``; see
            :mod:`slip.data.degrade`); None or ``none`` leaves the images as they are.
    """

    method: str = "slip-simclr"
    size: int | tuple[int, int] = 224
    views: MethodViews | None = None
    batch_size: int = 64
    mode: str = "epoch"
    epoch_samples: int | None = None
    shuffle_buffer: int = 1000
    shuffle_initial: int = 100
    shuffle_shards: bool = True
    seed: int = 0
    workers: int = 4
    rank: int | None = None
    world_size: int | None = None
    partial_batches: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS
    allow_draft: bool = True
    corpus: str | None = None
    pin_memory: bool | None = None
    prefetch_factor: int = 2
    persistent_workers: bool = False
    log_interval_s: float = 60.0
    text_truncation: str = "keep_eot"
    decode: str = "workers"
    saliency: str = "auto"
    subset: float | None = None
    degrade: str | None = None

    def resolved_views(self) -> MethodViews:
        """The views this config asks for."""
        return self.views if self.views is not None else method_views(self.method, self.size)


_DEFAULT_TOKENIZERS: dict[str, Tokenizer] = {}


def default_tokenizer(truncation: str = "keep_eot") -> Tokenizer:
    """open_clip's CLIP BPE tokenizer (context 77) with the given truncation of long captions
    (:func:`slip.tokenizer.get_tokenizer`), created once per process."""
    if truncation not in _DEFAULT_TOKENIZERS:
        from slip.tokenizer import get_tokenizer

        _DEFAULT_TOKENIZERS[truncation] = get_tokenizer(truncation=truncation)
    return _DEFAULT_TOKENIZERS[truncation]


def batches_per_worker(config: PipelineConfig, world_size: int) -> int | None:
    """Batches each worker yields per epoch when ``epoch_samples`` is set, else None."""
    if config.epoch_samples is None:
        return None
    per_rank = math.ceil(config.epoch_samples / (world_size * config.batch_size))
    return max(1, math.ceil(per_rank / max(1, config.workers)))


def _source_samples(
    source: ShardSource, config: PipelineConfig, rank: int, world_size: int, epoch: SharedEpoch, handler: TarErrorHandler,
    spans: dict[str, tuple[int, int]] | None,
) -> list[Any]:
    if config.mode == "resampled":
        shards: Any = wds.ResampledShards(
            list(source.urls), seed=config.seed, worker_seed=WorkerSeed(config.seed, rank, epoch), deterministic=True
        )
        stages: list[Any] = [shards]
    else:
        stages = [
            EpochShards(source.urls, rank, world_size, config.seed, epoch, shuffle=config.shuffle_shards),
            wds.split_by_worker,
            PassShuffle(config.seed, rank, epoch),
        ]
    stages.append(ReadShards(handler, spans))
    stages.append(wds.map(TagCorpus(source.corpus)))
    return stages


def build_dataset(
    spec: SpecLike,
    config: PipelineConfig | None = None,
    *,
    tokenizer: Tokenizer | None = None,
    counter: SkipCounter | None = None,
    epoch: SharedEpoch | None = None,
) -> wds.DataPipeline:
    """The webdataset pipeline yielding ready batches (run it in DataLoader workers).

    Stages: shard list (epoch split or resampled) -> tar reading (errors counted, samples
    numbered) -> weighted mix of sources -> shuffle buffer -> caption choice + one decode + crops
    -> batches with tokenised text. ``counter`` and ``epoch`` are created when not given; reach
    them through the returned pipeline's ``skip_counter`` and ``shared_epoch`` attributes; its
    ``sample_index`` is the spec's :class:`~slip.data.specs.SampleIndex` (None when unnumbered).
    """
    config = config or PipelineConfig()
    if config.mode not in ("epoch", "resampled"):
        raise ValueError(f"mode must be 'epoch' or 'resampled', got {config.mode!r}")
    if config.batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    from slip.tokenizer import TRUNCATIONS

    if config.text_truncation not in TRUNCATIONS:
        raise ValueError(f"text_truncation must be one of {', '.join(TRUNCATIONS)}, got {config.text_truncation!r}")
    views = config.resolved_views()
    if views.needs_text and tokenizer is None:
        tokenizer = default_tokenizer(config.text_truncation)
    rank, world_size = resolve_rank_world(config.rank, config.world_size)
    counter = counter or SkipCounter()
    epoch = epoch or SharedEpoch()
    handler = TarErrorHandler(counter)
    sources = parse_shard_spec(spec)
    if config.mode == "epoch":
        for source in sources:
            shares = world_size * max(1, config.workers)
            if len(source.urls) % shares:
                logger.info(
                    "%s: %d shards over %d ranks x %d workers: shares differ by one shard",
                    source.name, len(source.urls), world_size, max(1, config.workers),
                )

    numbering = sample_index(sources)
    per_source = [_source_samples(s, config, rank, world_size, epoch, handler,
                                  None if numbering is None else numbering.spans(i))
                  for i, s in enumerate(sources)]
    mix = None
    if len(sources) == 1:
        stages = list(per_source[0])
    else:
        mix = WeightedMix([wds.DataPipeline(*st) for st in per_source], [s.weight for s in sources], config.seed, rank, epoch)
        stages = [mix]
    if config.subset is not None:  # before the shuffle buffer: samples outside the subset never enter it
        stages.append(KeepSubset(config.subset))
    shuffle = None
    if config.shuffle_buffer > 0:
        shuffle = SampleShuffle(config.shuffle_buffer, config.shuffle_initial, config.seed, rank, epoch)
        stages.append(shuffle)
    if config.degrade is not None:  # after the buffer, whose samples a resume re-reads raw from the shards
        stages.append(DegradeImages(config.degrade, config.seed, config.max_pixels))
    stages.append(
        DecodeSamples(
            views, counter, seed=config.seed, rank=rank, epoch=epoch,
            max_pixels=config.max_pixels, allow_draft=config.allow_draft, corpus=config.corpus,
            resampled=config.mode == "resampled", decode=config.decode, saliency=config.saliency,
        )
    )
    stages.append(Batches(config.batch_size, Collate(views, tokenizer), config.partial_batches))
    pipeline = wds.DataPipeline(*stages)
    per_worker = batches_per_worker(config, world_size)
    if per_worker is not None:
        pipeline = pipeline.with_epoch(nbatches=per_worker)
    pipeline.skip_counter = counter
    pipeline.shared_epoch = epoch
    pipeline.decode_stage = next(st for st in stages if isinstance(st, DecodeSamples))
    # The stages whose state makes a resume position (see _ResumableBatches).
    pipeline.readers = [next(st for st in source if isinstance(st, ReadShards)) for source in per_source]
    pipeline.mix_stage, pipeline.shuffle_stage = mix, shuffle
    pipeline.sources = sources
    pipeline.sample_index = numbering
    pipeline.rank, pipeline.world_size = rank, world_size
    return pipeline


def set_passes(pipeline: wds.DataPipeline, passes: int = 0) -> None:
    """Set the per-pass counters of ``pipeline``'s stages (recursing into mixed sources), which
    seed their per-pass RNGs, so that the next iteration is pass ``passes`` of the epoch (0
    replays the epoch from its start) whether the stages run in worker copies (fresh each
    epoch) or in this process (``workers=0``, state carried over)."""
    for stage in pipeline.pipeline:
        if hasattr(stage, "_passes"):
            stage._passes = passes
        if isinstance(stage, wds.ResampledShards):
            stage.epoch = passes - 1  # its own per-iteration counter, part of its seed; iter() adds one
        if isinstance(stage, WeightedMix):
            for stream in stage.streams:
                set_passes(stream, passes)


def _stream_not_addressable(stream: Mapping[str, Any] | None, live: Sequence[int], numbered: bool) -> str | None:
    """Why a worker's saved stream state cannot be restored by seeking (None when it can).
    ``numbered``: the samples get global indices, so the state must say which samples its
    positions and buffered samples are (their ordinals and indices)."""
    if stream is None:
        return "the checkpoint holds no stream position (written by an older slip)"
    unnumbered = ("the checkpoint does not say which samples its positions are (written by an older slip, or "
                  "while the shards had no index.json): the samples' global indices are counted again")
    for i in live:
        reader = stream["readers"][i]
        if reader["shards"] and reader["next"] is None:
            return f"shard {reader['url']} cannot be read from an offset (not a seekable, uncompressed tar file)"
        if numbered and reader["shards"] and reader["next"] != SHARD_DONE and reader.get("ordinal") is None:
            return unnumbered
    shuffle = stream.get("shuffle")
    for ref in (shuffle or {}).get("buffer", ()):
        if ref[1] is None:
            return f"shard {ref[0]} cannot be read from an offset (not a seekable, uncompressed tar file)"
        if numbered and (len(ref) < 6 or ref[5] is None):
            return unnumbered
    return None


class _ResumableBatches(IterableDataset):
    """The batch pipeline as each DataLoader worker runs it, resumable at a position.

    Each batch is tagged with its worker, the (pass, index) of its last sample in that worker's
    stream and the state of the worker's stream right after that sample (``__stream__``: each
    source's shard, byte offset and ordinal of its next sample, the mixture's RNG and live
    sources, the shuffle buffer's sample places, ordinals and global indices and its RNG; see
    :class:`~slip.data.tars.ReadShards`). ``resume`` (set before
    iterating; workers get it in their copy) maps a worker to where it stopped. The worker then
    re-reads only its buffered samples, seeking to each, and continues its current shard at its
    offset. A state that cannot be restored by seeking (shards behind ``pipe:``/HTTP, compressed
    tars, a checkpoint without stream states) is replayed instead: the worker reads its shards
    again from the epoch's start and passes over the consumed samples without decoding them.
    Either way it yields only the batches it had left in the epoch.
    """

    def __init__(self, pipeline: wds.DataPipeline, per_worker: int | None) -> None:
        super().__init__()
        self.pipeline, self.per_worker = pipeline, per_worker
        self.resume: dict[int, dict[str, Any]] = {}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, _ = worker_id()
        state = self.resume.get(worker)
        self.pipeline.decode_stage.resume_after = None
        self.pipeline.decode_stage.continue_after = None
        self._restored_pass: int | None = None
        if state:
            self._restore(worker, state)
        remaining = None if self.per_worker is None else self.per_worker - (state["batches"] if state else 0)
        if remaining is not None and remaining <= 0:
            return
        for i, batch in enumerate(self._passes(), start=1):
            batch["__worker__"] = worker
            batch["__stream__"] = self._stream_state()
            yield batch
            if remaining is not None and i >= remaining:
                return

    def _stream_state(self) -> dict[str, Any]:
        pipeline = self.pipeline
        return {
            "readers": [reader.state() for reader in pipeline.readers],
            "mix": None if pipeline.mix_stage is None else pipeline.mix_stage.state(),
            "shuffle": None if pipeline.shuffle_stage is None else pipeline.shuffle_stage.state(),
        }

    def _restore(self, worker: int, state: Mapping[str, Any]) -> None:
        pipeline, decode = self.pipeline, self.pipeline.decode_stage
        who = f"rank {pipeline.rank} worker {worker}"
        position = (int(state["position"][0]), int(state["position"][1]))
        stream = state.get("stream")
        live = list(range(len(pipeline.readers)))
        if stream is not None and pipeline.mix_stage is not None and stream.get("mix") is not None:
            live = [int(i) for i in stream["mix"]["live"]]
        why = _stream_not_addressable(stream, live, pipeline.sample_index is not None)
        if why is not None:
            logger.info("%s: resuming by re-reading its shards from the epoch's start up to sample %d of pass %d, "
                        "without decoding them: %s", who, position[1], position[0], why)
            decode.resume_after = position
            return
        self._restored_pass = position[0]
        for i in live:
            pipeline.readers[i].restore = dict(stream["readers"][i])
        if pipeline.mix_stage is not None:
            pipeline.mix_stage.restore = stream["mix"]
        decode.continue_after = position
        buffered = ""
        if pipeline.shuffle_stage is not None:
            refs = stream["shuffle"]["buffer"]
            samples, cost = fetch_samples(refs)
            for ref, sample in zip(refs, samples):
                if sample is None:
                    pipeline.skip_counter.add(TAR_ERROR, f"resume: sample {ref[2]} is no longer at byte {ref[1]} of {ref[0]}")
            pipeline.shuffle_stage.restore = ([x for x in samples if x is not None], stream["shuffle"]["rng"])
            buffered = (f"re-read its {len(refs)} buffered samples ({cost['bytes'] / 1e6:.1f} MB from "
                        f"{cost['shards']:.0f} shards) in {cost['seconds']:.2f} s; ")
        current = [f"{r['url']} at byte {r['next']}" for r in (stream["readers"][i] for i in live)
                   if r["shards"] and r["next"] != SHARD_DONE]
        logger.info("%s: resumed after sample %d of pass %d: %s%s", who, position[1], position[0], buffered,
                    f"continues {', '.join(current)}" if current else "continues with its next shard")

    def _passes(self) -> Iterator[dict[str, Any]]:
        # Every stage is told its pass before each pass: stages that only run when pulled (a
        # mixture's exhausted source in a restored pass) must not fall behind the others.
        pass_no = self._restored_pass or 0
        if self.pipeline.repetitions == 1:  # one pass (no epoch length): nothing to cycle
            set_passes(self.pipeline, pass_no)
            yield from self.pipeline.iterator1()
            return
        # Cycle over the worker's shards until the epoch length is reached, as with_epoch
        # does, except that a pass that yields nothing because a resume skips all of it, or
        # because the checkpoint came at its end, is not taken for an empty dataset.
        resume_after = self.pipeline.decode_stage.resume_after
        while True:
            set_passes(self.pipeline, pass_no)
            produced = 0
            for batch in self.pipeline.iterator1():
                produced += 1
                yield batch
            skipped_whole_pass = resume_after is not None and pass_no <= resume_after[0]
            if produced == 0 and not skipped_whole_pass and pass_no != self._restored_pass:
                return
            pass_no += 1


def _as_built(batch: dict[str, Any]) -> dict[str, Any]:
    """The DataLoader's collate_fn: the batch as :class:`~slip.data.stages.Collate` made it."""
    return batch


def _ignore_stop_notice(worker_id: int) -> None:
    """Loader workers ignore SIGUSR1, a scheduler's notice to stop (SLURM's ``--signal``), which
    may reach the whole process group: the trainer stops at a step boundary and ends them."""
    import signal

    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


class SlipLoader:
    """A DataLoader over :func:`build_dataset` batches, plus epoch control, skip totals and a
    resumable position.

    Iterating yields the batch dicts described in the module docstring (uint8 views, pinned
    when ``pin_memory``). ``len()`` works when ``epoch_samples`` fixes the epoch length.

    :meth:`state_dict` is the position after the last batch handed out: per DataLoader worker,
    the (pass, index) of its last consumed sample, its batch count and its stream's state at
    that sample (each source's shard and byte offset, the mixture's and shuffle buffer's RNG
    states, the places of the buffered samples). After :meth:`load_state_dict`, the next
    iteration continues from there with the same batches in the same order as an uninterrupted
    run: each worker re-reads its buffered samples and continues its shard from the saved byte
    offset, so a resume reads about one shuffle buffer and one shard per worker wherever it
    falls in the epoch; shards that cannot seek (``pipe:``, HTTP, compressed tars) are re-read
    from the epoch's start instead, without decoding the consumed samples (logged with the
    reason and progress lines), and so are the states of an older slip that do not say which
    samples their positions are when the batches carry global indices (``index``). Batches are re-ordered to continue the DataLoader's round robin
    where it stopped.
    """

    def __init__(self, spec: SpecLike, config: PipelineConfig | None = None, *, tokenizer: Tokenizer | None = None) -> None:
        self.config = config or PipelineConfig()
        self.views = self.config.resolved_views()
        self.dataset = build_dataset(spec, self.config, tokenizer=tokenizer)
        self.counter: SkipCounter = self.dataset.skip_counter
        self.epoch: SharedEpoch = self.dataset.shared_epoch
        self.sources: list[ShardSource] = self.dataset.sources
        # The numbering of the samples (batch["index"]), None when a source has no index.json.
        self.sample_index: SampleIndex | None = self.dataset.sample_index
        self.rank, self.world_size = self.dataset.rank, self.dataset.world_size
        workers = self.config.workers
        per_worker = batches_per_worker(self.config, self.world_size)
        self.batches = _ResumableBatches(self.dataset, per_worker)
        pin = torch.cuda.is_available() if self.config.pin_memory is None else self.config.pin_memory
        self.loader = DataLoader(
            self.batches,
            batch_size=None,  # batches are formed in the workers (one IPC message per batch)
            # Collate has built each batch: torch's default (default_convert) would only walk the
            # batch and its stream position, thousands of objects, for nothing to convert.
            collate_fn=_as_built,
            num_workers=workers,
            worker_init_fn=_ignore_stop_notice if workers > 0 else None,
            pin_memory=pin,
            persistent_workers=self.config.persistent_workers and workers > 0,
            prefetch_factor=self.config.prefetch_factor if workers > 0 else None,
        )
        self.num_batches: int | None = None if per_worker is None else per_worker * max(1, workers)
        self._positions: dict[int, dict[str, Any]] = {}
        self._handed_out = 0
        self._pending: dict[str, Any] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (reshuffles shards and reseeds every random choice) from its start."""
        self.epoch.set(epoch)
        self._positions, self._handed_out, self._pending = {}, 0, None

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands (plain types, for checkpoints)."""
        return {"epoch": self.epoch.get(), "handed_out": self._handed_out,
                "workers": {str(w): dict(p) for w, p in self._positions.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` at the next iteration (a ``workers`` of None restarts its epoch)."""
        self.set_epoch(int(state["epoch"]))
        if state.get("workers") is not None:
            if self.config.persistent_workers:
                raise ValueError("resuming at a position needs persistent_workers=False")
            self._pending = dict(state)

    def require_sample_index(self, who: str = "this run") -> SampleIndex:
        """The numbering of the samples (their ``batch["index"]`` lies in ``range(size)``); raises
        :class:`~slip.data.specs.SampleIndexError`, naming each source without an ``index.json``
        and ``who`` needs it (e.g. ``"pirl"``), when the batches carry no ``index``."""
        return self.sample_index if self.sample_index is not None else require_sample_index(self.sources, who)

    def skipped(self) -> dict[str, int]:
        """Skipped samples by reason, over all workers so far."""
        return self.counter.counts()

    def device_decoder(self, device: torch.device | str) -> DeviceDecoder | None:
        """The decoder that finishes this loader's batches on ``device`` when images are decoded
        there (``decode="device"``; it counts what it cannot decode with the loader's skips), else
        None: the batches already hold ``image``/``views``."""
        if self.config.decode != "device":
            return None
        return DeviceDecoder(self.views.all, device, has_clip=self.views.clip is not None, skips=self.counter)

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("the epoch length is unknown; set PipelineConfig.epoch_samples")
        return self.num_batches

    def _ordered(self, batches: Iterable[dict[str, Any]], first: int) -> Iterator[dict[str, Any]]:
        # The DataLoader takes batches from workers 0, 1, ..., W-1 in turn. A resumed run must
        # continue the turn where it stopped (worker `first`), so hold back early arrivals.
        workers = max(1, self.config.workers)
        if first % workers == 0:
            yield from batches
            return
        waiting: dict[int, list[dict[str, Any]]] = {w: [] for w in range(workers)}
        turn = first % workers
        for batch in batches:
            waiting[batch["__worker__"]].append(batch)
            while waiting[turn]:
                yield waiting[turn].pop(0)
                turn = (turn + 1) % workers
        while any(waiting.values()):  # a worker ran out early: keep the turn order for the rest
            if waiting[turn]:
                yield waiting[turn].pop(0)
            turn = (turn + 1) % workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # A new iteration starts the epoch afresh, unless load_state_dict asked to resume.
        pending, self._pending = self._pending, None
        self._positions, self._handed_out = {}, 0
        if pending is not None:
            self._positions = {int(w): dict(p) for w, p in pending["workers"].items()}
            self._handed_out = int(pending["handed_out"])
        self.batches.resume = {w: dict(p) for w, p in self._positions.items()}
        last_log = time.monotonic()
        last_counts: dict[str, int] = {}
        for batch in self._ordered(self.loader, self._handed_out):
            worker = batch.pop("__worker__")
            position = batch.pop("__position__")
            stream = batch.pop("__stream__")
            done = self._positions.get(worker, {}).get("batches", 0)
            self._positions[worker] = {"position": [int(position[0]), int(position[1])], "batches": done + 1,
                                       "stream": stream}
            self._handed_out += 1
            yield batch
            now = time.monotonic()
            if now - last_log >= self.config.log_interval_s:
                last_log = now
                counts = self.counter.counts()
                if counts != last_counts:
                    logger.info("skipped samples so far (all workers): %s", counts)
                    last_counts = counts
        counts = self.counter.counts()
        if counts:
            logger.info("skipped samples after this pass (all workers): %s", counts)


def build_loader(
    spec: SpecLike, config: PipelineConfig | None = None, *, tokenizer: Tokenizer | None = None, **overrides: Any
) -> SlipLoader:
    """Build the training loader for ``spec``; keyword ``overrides`` replace config fields,
    e.g. ``build_loader("shards/", batch_size=256, workers=8)``."""
    config = replace(config or PipelineConfig(), **overrides)
    return SlipLoader(spec, config, tokenizer=tokenizer)
