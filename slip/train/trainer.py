"""The training loop: config -> model, data, optimizer, schedule -> steps, logs, checkpoints.

Runs unchanged in one process and under ``torchrun``. The trainer alone owns backward,
precision, gradient synchronisation and the optimizer step; the model returns embeddings and
:func:`slip.losses.slip_objective` turns them into losses.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import distributed as D
from .. import runtime
from ..losses import slip_objective
from ..models import create_model, get_architecture
from ..models.batchnorm import sync_batchnorm
from .checkpoints import CheckpointManager, rng_state, set_rng_state
from .config import Config, ConfigError, save_config
from .logger import MetricLogger, format_duration
from .optim import build_optimizer, build_schedule, schedule_steps
from .step import accumulated_step, batch_size_of, plain_step

logger = logging.getLogger(__name__)


class TrainingStopped(runtime.RunStopped):
    """The run stopped on purpose (too many non-finite losses, no data); the message says why."""


@dataclass
class TrainResult:
    step: int
    checkpoint: Path | None
    last_losses: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)
    skipped_updates: int = 0
    skipped_samples: dict = field(default_factory=dict)


def load_tokenizer(cfg: Config):
    """The visual tokenizer ``objective.tokenizer`` names, or None when the method needs none."""
    from ..ssl import method_class

    if cfg.objective.ssl == "none" or not method_class(cfg.objective.ssl).needs_visual_tokenizer:
        return None
    from ..ssl.visual_tokenizers import load_visual_tokenizer

    vision = get_architecture(cfg.model.name).vision
    try:  # a codebook directory is sized to give one code per patch of the tower
        return load_visual_tokenizer(cfg.objective.tokenizer, grid=vision.image_size // vision.patch_size)
    except FileNotFoundError as e:
        raise ConfigError(f"objective.tokenizer: {e}; fit a k-means codebook on the training shards with "
                          f"`slip fit-tokenizer SHARDS {cfg.objective.tokenizer} --patch P --input-size S` "
                          "(S / P codes per side = the tower's patch grid), or point to a FLAVA codebook directory") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"objective.tokenizer: {e}") from None


def resolve_architecture(cfg: Config, tokenizer=None):
    """The model preset named by ``model.name``, with the SSL branch the objective asks for
    (and, for BEiT, a head over ``tokenizer``'s vocabulary)."""
    arch = get_architecture(cfg.model.name)
    if cfg.objective.ssl == "none":
        return arch
    return arch.with_ssl_method(cfg.objective.ssl, tokenizer.vocab_size if tokenizer is not None else None,
                                **cfg.model.ssl_head.given())


def data_views(cfg: Config, model, image_size: int):
    """What the data pipeline cuts from each image: the CLIP view if the objective has the
    image-text loss, then the SSL method's own views (and patch mask)."""
    from ..data.views import MethodViews, clip_view

    clip = clip_view(image_size) if cfg.objective.clip else None
    if cfg.objective.ssl == "none":
        return MethodViews(clip=clip)
    return dataclasses.replace(model.ssl.data_views(image_size, mask_ratio=cfg.objective.mask_ratio, objective=cfg.objective), clip=clip)


def _samples_per_epoch(cfg: Config, sources) -> int:
    if cfg.data.samples_per_epoch is not None:
        return cfg.data.samples_per_epoch
    counts = [s.num_samples for s in sources]
    if any(c is None for c in counts):
        raise ConfigError("data.samples_per_epoch: the shards have no index.json with sample counts; set it")
    # data.subset keeps that share of the samples (slip.data.degrade): an epoch is the subset's expected size
    return int(sum(counts)) if cfg.data.subset is None else max(1, round(sum(counts) * cfg.data.subset))


def _add_counts(*counts: dict) -> dict[str, int]:
    total: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            total[k] = total.get(k, 0) + int(v)
    return total


def _split(batch: dict, parts: int) -> list[dict]:
    n = batch_size_of(batch)
    if n % parts:
        raise ValueError(f"a batch of {n} cannot be split into {parts} equal micro-batches")
    size = n // parts
    out = []
    for i in range(parts):
        s = slice(i * size, (i + 1) * size)
        out.append({k: ([t[s] for t in v] if isinstance(v, list) and v and isinstance(v[0], torch.Tensor)
                        else v[s]) for k, v in batch.items()})
    return out


# Settings that may change when a run resumes: where and how often things are logged, saved
# and evaluated, how the data is read, where to stop, and how memory is spent (activation
# checkpointing, compilation and accumulation change no number: accumulation equals the whole
# batch by construction). A precision change is allowed with a warning. Everything else
# defines the run.
_RESUMABLE_CHANGES = {"train.output_dir", "train.log_every", "train.save_every", "train.keep_last",
                      "train.max_steps", "train.max_nonfinite", "data.workers", "data.train", "eval.benchmark",
                      "eval.catalog", "eval.every", "eval.batch_size", "eval.knn", "eval.knn_k",
                      "eval.knn_temperature", "model.grad_checkpointing", "model.compile", "train.accum_steps",
                      "train.world_change", "train.init_from"}
_WARNED_CHANGES = {"train.precision", "data.decode"}  # data.decode: crops differ by resampling only


def _config_changes(saved: dict, current: dict, prefix: str = "", defaults: dict | None = None) -> list[tuple[str, str]]:
    """(key, "key: old -> new") of every setting that differs, resumable ones included. A setting
    the saved config lacks (written before it existed) counts as its default (``defaults``)."""
    changes = []
    defaults = defaults or {}
    for key in sorted(set(saved) | set(current)):
        name = prefix + key
        a, b = saved.get(key, defaults.get(key)), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += _config_changes(a, b, name + ".", defaults.get(key) if isinstance(defaults.get(key), dict) else None)
        elif a != b:
            changes.append((name, f"{name}: {a!r} -> {b!r}"))
    return changes


class Trainer:
    """Builds everything from a :class:`Config` and runs it; see :meth:`run`."""

    def __init__(self, cfg: Config, *, log_stream=None):
        self.cfg = cfg
        t = cfg.train
        try:
            self.rt = runtime.start(precision=t.precision)
        except ValueError as e:
            raise ConfigError(f"train.precision: {e}") from None
        self.rank, self.world, self.device = self.rt.rank, self.rt.world, self.rt.device
        per_rank, rem = divmod(t.batch_size, self.world * t.accum_steps)
        if rem or per_rank < 1:
            raise ConfigError(f"train.batch_size {t.batch_size} is not divisible by {self.world} ranks "
                              f"x {t.accum_steps} accumulation steps")
        self.micro_batch = per_rank
        self.output_dir = Path(t.output_dir)

        runtime.seed_everything(t.seed + self.rank)
        torch.manual_seed(t.seed)  # identical initial weights on every rank
        tokenizer = load_tokenizer(cfg)
        model = create_model(resolve_architecture(cfg, tokenizer))
        if tokenizer is not None:
            model.ssl.attach_visual_tokenizer(tokenizer.to(self.device))
        if cfg.model.grad_checkpointing:
            model.set_grad_checkpointing(True)
        if cfg.model.freeze_patch_embed:
            model.visual.patch_embed.requires_grad_(False)
        model.to(self.device)
        if self.world > 1:
            model = sync_batchnorm(model, self.device)
        self.model = model
        runtime.seed_everything(t.seed + self.rank)
        ssl_loss = None
        if cfg.objective.ssl != "none":
            ssl_loss = functools.partial(model.ssl.loss, temperature=cfg.objective.ssl_temperature)
        self.objective = functools.partial(slip_objective, clip=cfg.objective.clip, ssl_loss=ssl_loss,
                                           ssl_scale=cfg.objective.ssl_scale, gather=cfg.objective.gather)

        self.loader = self._build_loader()
        from ..data.augment import BatchAugment

        self.augment = BatchAugment(self.loader.views, out_dtype=self.rt.amp_dtype or torch.float32).to(self.device)
        self.decoder = self.loader.device_decoder(self.device)  # None when the workers decode
        self.steps_per_epoch, self.total_steps = schedule_steps(
            _samples_per_epoch(cfg, self.loader.sources), t.batch_size, t.epochs)
        self.last_step = min(self.total_steps, t.max_steps or self.total_steps)
        self.optimizer = build_optimizer(model, cfg.optim, fused=self.device.type == "cuda")
        self.schedule = build_schedule(self.optimizer, cfg.optim, self.total_steps, self.steps_per_epoch)
        if model.has_ssl_head:
            corpus_size = None
            if model.ssl.needs_sample_index:  # a memory bank of one row per sample (PIRL)
                corpus_size = self.loader.require_sample_index(f"objective.ssl={cfg.objective.ssl}").size
            model.ssl.configure_training(cfg.objective, self.steps_per_epoch, self.total_steps,
                                         corpus_size=corpus_size, seed=t.seed)
        self.scaler = self.rt.grad_scaler()

        # DDP when each step is one forward; accumulation syncs gradients once by hand.
        if t.accum_steps == 1:
            self.forward_model = self.rt.ddp(model)
        else:
            D.broadcast_module_(model)
            self.forward_model = model
        if cfg.model.compile:
            if t.accum_steps == 1:
                self.forward_model = torch.compile(self.forward_model)
            else:  # accumulation calls the towers itself (twice per micro-batch): compile them in place
                model.visual.compile()
                if model.has_text:
                    model.transformer.compile()

        self.checkpoints = CheckpointManager(self.output_dir, t.keep_last)
        self.log = MetricLogger(self.output_dir, enabled=D.is_main_process(), stream=log_stream,
                                total_steps=self.last_step)
        self.step = 0
        self.stop = runtime.StopSignals()  # SIGUSR1 / SIGTERM: checkpoint at the step's end, then stop
        self.go_on = True
        self.nonfinite = runtime.NonFiniteGuard(t.max_nonfinite, str(self.checkpoints.dir), TrainingStopped,
                                                 "train.max_nonfinite")
        self.skipped_before: dict[str, int] = {}  # this rank's skipped samples before a resume
        self.validator = self._build_validator()

    # ----------------------------------------------------------------------------------
    def _build_loader(self):
        from ..data.degrade import parse_degradations
        from ..data.pipeline import PipelineConfig, SlipLoader
        from ..data.specs import parse_shard_spec

        cfg = self.cfg
        size = cfg.data.image_size or self.model.arch.vision.image_size
        # Every rank must see the same number of batches per epoch: the epoch length is fixed.
        sources = parse_shard_spec(cfg.data.train)
        image_only = [s.name for s in sources if not s.captions]
        if image_only and cfg.objective.clip:
            raise ConfigError(f"data.train: {', '.join(image_only)} holds no captions (written with make-shards "
                              "--no-captions); an objective with the image-text loss needs them: set "
                              "objective.clip=false to train the SSL branch alone, or use a captioned corpus")
        samples = _samples_per_epoch(cfg, sources)
        readers = self.world * max(1, cfg.data.workers)
        for source in sources:
            if not cfg.data.resampled and len(source.urls) < readers:
                # Shards are the unit of splitting in epoch mode; a reader without one yields nothing.
                raise ConfigError(
                    f"data.train: {source.name} has {len(source.urls)} shards, fewer than {self.world} ranks x "
                    f"{max(1, cfg.data.workers)} workers; write smaller shards, lower data.workers, "
                    "or set data.resampled=true")
        pipeline = PipelineConfig(
            views=data_views(cfg, self.model, size), batch_size=self.micro_batch * cfg.train.accum_steps,
            mode="resampled" if cfg.data.resampled else "epoch", shuffle_buffer=cfg.data.shuffle_buffer,
            shuffle_initial=min(100, cfg.data.shuffle_buffer), seed=cfg.train.seed, workers=cfg.data.workers,
            rank=self.rank, world_size=self.world, partial_batches=False, epoch_samples=samples,
            text_truncation=cfg.model.text_truncation, decode=self._decode_mode(), saliency=cfg.data.saliency,
            subset=cfg.data.subset,  # checked by config.validate
            degrade=cfg.data.degrade if parse_degradations(cfg.data.degrade) else None,
        )
        return SlipLoader(cfg.data.train, pipeline)

    def _decode_mode(self) -> str:
        """``data.decode``, with ``auto`` resolved: decode on the training device when it is a GPU."""
        mode = self.cfg.data.decode
        return ("device" if self.device.type == "cuda" else "workers") if mode == "auto" else mode

    def _build_validator(self) -> list:
        from .validation import KNNValidator, ZeroShotValidator

        e, size = self.cfg.eval, self.model.arch.vision.image_size
        if e.benchmark is not None and not self.model.has_text:
            raise ConfigError(f"eval.benchmark: zero-shot validation needs a text tower, which {self.cfg.model.name} "
                              "does not have; use eval.knn for k-NN validation of the image tower")
        return ([ZeroShotValidator(e, image_size=size)] if e.benchmark is not None else []) + \
            ([KNNValidator(e, image_size=size)] if e.knn is not None else [])

    def _init_from(self, model, path: str) -> None:
        """Load ``train.init_from``'s weights: every tower tensor, with its shape; the heads the
        file holds; fresh heads for the rest (momentum copies start from the loaded tower)."""
        from ..checkpoint import read_checkpoint, tower_differences
        from ..ssl.base import MomentumMethod, ema_update

        ckpt = read_checkpoint(path)
        theirs = ckpt.state_dict
        own = model.state_dict()
        for key, value in theirs.items():
            if key in own and value.shape != own[key].shape:
                raise ConfigError(f"train.init_from: {path}: {key} has shape {tuple(value.shape)}, "
                                  f"{self.cfg.model.name} needs {tuple(own[key].shape)}")
        # Settings without tensors (activation, LayerNorm eps, pre-norm) that shapes cannot catch.
        differences = tower_differences(ckpt.arch, model.arch)
        if differences:
            raise ConfigError(f"train.init_from: {path}: its towers differ from {self.cfg.model.name}'s: "
                              + "; ".join(differences))
        towers = [k for k in own if not k.startswith("ssl.")]
        missing = [k for k in towers if k not in theirs]
        if missing:
            raise ConfigError(f"train.init_from: {path} lacks {len(missing)} tensor(s) of the towers, e.g. {missing[:3]}")
        model.load_state_dict({k: v for k, v in theirs.items() if k in own}, strict=False)
        if isinstance(getattr(model, "ssl", None), MomentumMethod) and not any(
                k.startswith("ssl.momentum_") for k in theirs):
            ema_update(model.ssl.momentum_encoder, model.visual, 0.0)  # momentum 0: a copy
            ema_update(model.ssl.momentum_projector, model.ssl.projector, 0.0)
        heads = sorted({k.split(".")[1] for k in own if k.startswith("ssl.") and k not in theirs})
        logger.info("initialised from %s%s", path, f" (fresh: ssl.{', ssl.'.join(heads)})" if heads else "")

    # ----------------------------------------------------------------------------------
    def _train_step(self, batch: dict) -> dict:
        batch = self.rt.to_device(batch)
        if self.decoder is not None:
            batch = self.decoder(batch)
        # Augmentation draws depend only on (seed, step, global row): the same for any number of
        # ranks, and reproduced exactly after a resume.
        n = batch_size_of(batch)
        generator = torch.Generator(self.device).manual_seed(self.cfg.train.seed * 1_000_003 + self.step)
        batch = self.augment(batch, generator=generator, rows=(self.rank * n, self.world * n))
        self.schedule.step_update(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        accum = self.cfg.train.accum_steps
        if accum == 1:
            losses = plain_step(self.forward_model, batch, self.objective, self.rt.autocast, self.scaler.scale)
        else:
            losses = accumulated_step(self.model, _split(batch, accum), self.objective, self.rt.autocast,
                                      self.scaler.scale)
            D.all_reduce_mean_([p.grad for p in self.model.parameters() if p.grad is not None])
        allowed, self.go_on = self.nonfinite.update_allowed_and_go_on(losses["loss"], self.step, self.stop)
        if not allowed:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            if self.model.has_ssl_head:
                self.model.ssl.before_optimizer_step(self.step)
            if self.cfg.optim.clip_grad_norm:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad_norm)
            if not self._scaled_step():
                # fp16 overflow: GradScaler skipped the update and lowered its scale. Counted
                # with the skipped updates; the momentum encoders stay where the weights are.
                self.nonfinite.skipped += 1
            elif self.model.has_ssl_head:  # momentum updates of the SSL method, if it has any
                extra = self.model.ssl.on_step_end(self.step + 1, self.total_steps, self.model.visual,
                                                   base_momentum=self.cfg.objective.momentum)
                losses = {**losses, **extra}
            if self.model.has_text:
                with torch.no_grad():  # CLIP's clamp: logits scaled by at most logit_scale_max
                    self.model.logit_scale.clamp_(0, math.log(self.cfg.train.logit_scale_max))
        return _to_floats(losses)

    def _scaled_step(self) -> bool:
        """The optimizer step through the loss scaler; False when fp16 gradients overflowed and
        the scaler skipped it (its scale then drops, the one outward sign of a skip)."""
        if not self.scaler.is_enabled():
            self.optimizer.step()
            return True
        before = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= before

    # ----------------------------------------------------------------------------------
    def skipped_samples(self) -> dict[str, int]:
        """This rank's skipped samples by reason over the whole run (across resumes). Samples
        decoded ahead of a checkpoint (prefetched, not yet trained on) are decoded again after
        a resume, so a bad one among them can be counted twice."""
        return _add_counts(self.skipped_before, self.loader.skipped())

    def _state(self) -> dict:
        ranks = D.all_gather_object({"rng": rng_state(), "data": self.loader.state_dict(),
                                     "skipped_samples": self.skipped_samples()})
        # State an SSL method shards over ranks (PIRL's memory bank), whole on rank 0: collective.
        ssl_state = self.model.ssl.gathered_state() if self.model.has_ssl_head else {}
        return {
            **({"ssl_state": ssl_state} if ssl_state else {}),
            "epoch": self.step // self.steps_per_epoch,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "config": self.cfg.to_dict(),
            "world_size": self.world,
            "ranks": ranks,
            **self.nonfinite.state_dict(),
        }

    def save(self) -> Path | None:
        state = self._state()  # collective: every rank takes part
        path = None
        if D.is_main_process():
            path = self.checkpoints.save(self.model, self.step, **state)
        D.barrier()
        return path or self.checkpoints.path_for(self.step)

    def try_resume(self) -> bool:
        if D.is_main_process():
            self.checkpoints.remove_stale_temporaries()
        D.barrier()
        found = self.checkpoints.latest()
        if found is None:
            return False
        ckpt, path = found
        meta = ckpt.meta
        changes = _config_changes(meta.get("config", {}), self.cfg.to_dict(), defaults=Config().to_dict())
        changed = [text for name, text in changes if name not in _RESUMABLE_CHANGES | _WARNED_CHANGES]
        if changed:
            raise ConfigError(f"{path}: {self.output_dir} holds a run with a different configuration "
                              f"({'; '.join(changed)}); resume with the same settings or use another train.output_dir")
        for name, text in changes:
            if name in _WARNED_CHANGES:
                logger.warning("resuming with a changed setting (%s): the run's numbers will differ from an "
                               "uninterrupted one from here on", text)
        self.model.load_state_dict(ckpt.state_dict)
        if self.model.has_ssl_head:  # each rank keeps its share, whatever the ranks that wrote it
            self.model.ssl.load_gathered_state(meta.get("ssl_state", {}))
        self.optimizer.load_state_dict(meta["optimizer"])
        if self.scaler.is_enabled() and meta["scaler"]:  # empty when saved without fp16 loss scaling
            self.scaler.load_state_dict(meta["scaler"])
        self.step = int(meta["step"])
        self.nonfinite.load_state_dict(meta)
        ranks = meta["ranks"]
        if meta["world_size"] == self.world:
            mine = ranks[self.rank]
            self.skipped_before = dict(mine.get("skipped_samples", {}))
            set_rng_state(mine["rng"])
            self.loader.load_state_dict(mine["data"])
            consumed = int(mine["data"].get("handed_out", 0)) * self.micro_batch * self.cfg.train.accum_steps
            replay = (f"exact position restored, {consumed} samples per rank into epoch {mine['data']['epoch']}: each "
                      f"loader worker re-reads its shuffle buffer and continues its shard from the saved byte offset "
                      f"(shards that cannot seek are re-read from the epoch's start instead; the workers log which)"
                      if consumed else "exact position restored")
        else:
            # Another world size splits the data differently: each rank's and worker's place in
            # its shards means nothing to another split. At an epoch boundary nothing is lost.
            epoch, into = divmod(self.step, self.steps_per_epoch)
            if into and self.cfg.train.world_change != "restart_epoch":
                raise ConfigError(
                    f"{path}: written by {meta['world_size']} ranks at step {self.step}, {into} steps into epoch "
                    f"{epoch}; the data position of {meta['world_size']} ranks cannot be carried over to {self.world}. "
                    f"Resume with {meta['world_size']} ranks, or set train.world_change=restart_epoch to read epoch "
                    f"{epoch} again from its start (its first {into} steps' samples are then seen twice)")
            self.loader.load_state_dict({"epoch": self.step // self.steps_per_epoch, "workers": None})
            if self.rank == 0:  # the run's totals are kept, on one rank
                self.skipped_before = _add_counts(*(r.get("skipped_samples", {}) for r in ranks))
            replay = f"world size changed {meta['world_size']} -> {self.world}: epoch restarted, RNG reseeded"
        self.log.message(f"resumed from {path} at step {self.step} ({replay})")
        return True

    # ----------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.cfg
        if D.is_main_process():
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.output_dir / "config.yaml")
        resumed = self.try_resume()
        if not resumed and cfg.train.init_from:  # a resumed run has its own weights
            self._init_from(self.model, cfg.train.init_from)
        if not resumed or self.step % self.steps_per_epoch == 0:
            self.loader.set_epoch(self.step // self.steps_per_epoch)  # from the epoch's start
        n_params = sum(p.numel() for p in self.model.parameters())
        self.log.message(
            f"training {cfg.model.name} ({n_params / 1e6:.1f}M parameters) on {self.world} x {self.device.type}, "
            f"global batch {cfg.train.batch_size} ({self.micro_batch} per rank x {cfg.train.accum_steps} accumulation), "
            f"{self.steps_per_epoch} steps/epoch, steps {self.step}->{self.last_step} of {self.total_steps}")
        last_losses: dict = {}
        validation: dict = {}
        last_ckpt = None
        window_start, data_wait, window_steps = time.perf_counter(), 0.0, 0
        run_start, start_step = time.perf_counter(), self.step
        batches, produced = iter(self.loader), 0
        try:
            with self.stop:  # SIGUSR1 / SIGTERM: checkpoint at the end of the step, then stop
                while self.step < self.last_step:
                    t0 = time.perf_counter()
                    try:
                        batch = next(batches)
                    except StopIteration:
                        if produced == 0:
                            raise TrainingStopped(self._no_data_message()) from None
                        self.loader.set_epoch(self.step // self.steps_per_epoch)
                        batches, produced = iter(self.loader), 0
                        continue
                    produced += 1
                    data_wait += time.perf_counter() - t0
                    last_losses = self._train_step(batch)
                    self.step += 1
                    window_steps += 1
                    if self.step % self.steps_per_epoch == 0 and self.step < self.last_step:
                        self.loader.set_epoch(self.step // self.steps_per_epoch)
                        batches, produced = iter(self.loader), 0
                    if self.step % cfg.train.log_every == 0 or self.step == self.last_step:
                        elapsed = time.perf_counter() - window_start
                        per_step = (time.perf_counter() - run_start) / max(self.step - start_step, 1)
                        last_losses = self._log_step(last_losses, window_steps / max(elapsed, 1e-9),
                                                     data_wait / max(elapsed, 1e-9), per_step)
                        window_start, data_wait, window_steps = time.perf_counter(), 0.0, 0
                    if self.validator and cfg.eval.every and self.step % cfg.eval.every == 0 \
                            and self.step < self.last_step:
                        validation = self.validate()
                    if self.step % cfg.train.save_every == 0 and self.step < self.last_step:
                        last_ckpt = self.save()
                    if not self.go_on and self.step < self.last_step:
                        if last_ckpt is None or last_ckpt != self.checkpoints.path_for(self.step):
                            last_ckpt = self.save()
                        raise runtime.Preempted(
                            f"stopped on {self.stop.received or 'a signal to another rank'} at step {self.step} with "
                            f"checkpoint {last_ckpt}; rerun the same command to resume from it")
                last_ckpt = self.save()
                if self.validator:
                    validation = self.validate()
        finally:
            skipped = self.skipped_samples()
            if skipped:
                who = "" if self.world == 1 else f" (rank {self.rank}; the logged skipped_samples is over all ranks)"
                self.log.message(f"skipped samples{who}: {skipped}")
            self.log.close()
        return TrainResult(self.step, last_ckpt, last_losses, validation, self.nonfinite.skipped, skipped)

    def _log_step(self, losses: dict, steps_per_s: float, data_wait: float, seconds_per_step: float) -> dict:
        """Log the step's losses (averaged over ranks: collective) with the run's figures."""
        losses = D.mean_over_ranks(losses)
        skipped_samples = sum(sum(c.values()) for c in D.all_gather_object(self.skipped_samples()))
        self.log.log({
            **losses,
            "lr": self.optimizer.param_groups[0]["lr"],
            "logit_scale": float(self.model.logit_scale.detach().exp()) if self.model.has_text else None,
            "samples_per_s": round(steps_per_s * self.cfg.train.batch_size, 2),
            "data_wait": round(data_wait, 3),
            "peak_mem_gib": round(self.rt.peak_memory_gib(), 3),
            "skipped_updates": self.nonfinite.skipped,
            "skipped_samples": skipped_samples,
            "eta": format_duration(seconds_per_step * (self.last_step - self.step)),
        }, self.step)
        return losses

    def _no_data_message(self) -> str:
        skipped = self.loader.skipped()
        why = (f"every sample read was skipped: {', '.join(f'{k} {v}' for k, v in sorted(skipped.items()))}"
               if skipped else "its shards held no sample")
        where = "" if self.world == 1 else f" on rank {self.rank}"
        return (f"stopped at step {self.step}: a pass over data.train={self.cfg.data.train!r} yielded no batch{where}; "
                f"{why}. Check the shards (e.g. `slip bench-data` on them shows the same counts); the first skip "
                "of each reason is logged above with its sample key and detail")

    def validate(self) -> dict:
        self.model.eval()
        try:
            result = {k: v for validator in self.validator for k, v in validator(self.model, self.device).items()}
        finally:
            self.model.train()
        self.log.log(result, self.step, kind="eval")
        return result


def _to_floats(values: dict) -> dict[str, float]:
    """Python floats of a step's logged values, the device's read in one transfer (a host sync
    each would make the host wait for the device several times per step)."""
    on_device = [k for k, v in values.items() if isinstance(v, torch.Tensor)]
    read = []
    if on_device:  # float64: float32 values and integer counts come back exact
        device = values[on_device[0]].device
        read = torch.stack([values[k].detach().to(device, torch.float64).reshape(()) for k in on_device]).tolist()
    from_device = dict(zip(on_device, read, strict=True))
    return {k: from_device[k] if k in from_device else float(v) for k, v in values.items()}


def train(cfg: Config, *, log_stream=None) -> TrainResult:
    """Train with ``cfg`` (resuming from ``cfg.train.output_dir`` when it holds checkpoints)."""
    return Trainer(cfg, log_stream=log_stream).run()
