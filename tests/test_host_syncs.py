"""A training step reads no device value on the host before its update.

On an accelerator, ``int()``/``float()``/``bool()``/``.item()`` of a device tensor, and the ops
whose output size depends on the data (``torch.unique``, boolean indexing, ``nonzero``,
``one_hot``'s bounds check), make the host wait until the device has run everything queued so
far: the host can no longer launch the backward pass while the forward runs, nor the next
step's decode while this one's backward runs. A step has one such read by design, after its
losses (whether every rank's loss is finite, which decides the update).

The CPU stands in for the device: a dispatch mode records those ops while the trainer decodes
(``data.decode=device``), augments and runs forward, loss and backward. One-time reads (PIRL's
normalisation constant, the methods' host copies of their counters) happen in the first steps,
so the recorded step is the third. What the CPU cannot show is the other direction: on CUDA a
host tensor copied to the device from pageable memory (``torch.tensor(..., device="cuda")``, a
plain ``.to("cuda")``) also synchronises first, so slip sends host data through
:func:`slip.runtime.host_to_device`; the CUDA variant below checks both directions with CUDA's
own sync check.
"""
from __future__ import annotations

import traceback
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from slip.data.augment import BatchAugment
from slip.data.decode import DeviceDecoder
from slip.data.synthetic import generate_synthetic
from slip.train import trainer as trainer_module
from slip.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
# Ops that read device memory on the host: scalar reads, and ops whose output size is data-dependent.
READS = {"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "_unique2", "unique_dim",
         "unique_consecutive", "repeat_interleave"}

pytestmark = pytest.mark.usefixtures("one_torch_thread_module")


class HostReads(TorchDispatchMode):
    """Records, per op that would read device memory, the innermost slip frame that called it."""

    def __init__(self):
        super().__init__()
        self.sites: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        bool_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (args[1] if len(args) > 1 else ()) or ())
        if name in READS or bool_index:
            frames = [f for f in traceback.extract_stack()[:-1] if f"{Path('slip')}/" in f.filename
                      and "/tests/" not in f.filename]
            where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
            self.sites.append(f"{name} at {where}")
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    generate_synthetic(out, seed=3, train_samples=64, test_per_class=1, image_size=32, samples_per_shard=32)
    return out / "train"


class CudaSyncs:
    """On a GPU: torch's own sync check (``torch.cuda.set_sync_debug_mode``), its warnings recorded."""

    def __init__(self):
        self.sites: list[str] = []

    def __enter__(self):
        self._caught = warnings.catch_warnings(record=True)
        self._log = self._caught.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")
        self._caught.__exit__(*exc)
        self.sites += [str(w.message) for w in self._log if "synchroniz" in str(w.message)]


def reads_in_third_step(monkeypatch, corpus: Path, out: Path, recipe: str, *overrides: str,
                        recorder=None) -> list[str]:
    """The host reads of the third training step's decode, augmentation, forward, loss and backward."""
    recorder, steps = recorder or HostReads(), [0]

    def recorded(function):
        def call(*args, **kwargs):
            if steps[0] != 3:
                return function(*args, **kwargs)
            with recorder:
                return function(*args, **kwargs)
        return call

    def counting_step(self, batch):
        steps[0] += 1
        return train_step(self, batch)

    train_step = trainer_module.Trainer._train_step
    monkeypatch.setattr(trainer_module.Trainer, "_train_step", counting_step)
    monkeypatch.setattr(trainer_module, "plain_step", recorded(trainer_module.plain_step))
    monkeypatch.setattr(DeviceDecoder, "__call__", recorded(DeviceDecoder.__call__))
    monkeypatch.setattr(BatchAugment, "__call__", recorded(BatchAugment.__call__))
    cfg = load_config(ROOT / "configs" / "tiny" / f"{recipe}.yaml",
                      [f"data.train={corpus}", f"train.output_dir={out}", "train.max_steps=3", "data.decode=device",
                       "train.log_every=100", "train.batch_size=8", "train.precision=fp32", *overrides])
    trainer_module.train(cfg)
    assert steps[0] == 3
    return recorder.sites


@pytest.fixture(scope="module")
def tokenizer(corpus):
    # BEiT's targets: a k-means codebook fitted on the corpus, as tests/test_ssl.py makes one.
    from slip.ssl import fit_tokenizer

    path = corpus.parent / "tokenizer.safetensors"
    assert fit_tokenizer.main([str(corpus), str(path), "--k", "16", "--patch", "4", "--input-size", "16",
                               "--samples", "64", "--no-progress"]) == 0
    return path


def test_beits_masked_tokens_are_picked_without_reading_their_count(monkeypatch, corpus, tokenizer, tmp_path):
    # The data's masks hold at most their generator's target: fixed-size slots, weighted.
    sites = reads_in_third_step(monkeypatch, corpus, tmp_path / "run", "slip_beit", f"objective.tokenizer={tokenizer}")
    assert sites == []


def test_beits_slotted_loss_equals_the_loss_over_the_selected_masked_patches():
    import slip
    from slip.models import get_architecture

    torch.manual_seed(0)
    beit = slip.create_model(get_architecture("simclr_vit_tiny").with_ssl_method("beit", vocab_size=7)).ssl
    g = torch.Generator().manual_seed(1)
    tokens, codes = torch.randn(3, 16, 64, generator=g), torch.randint(7, (3, 16), generator=g)
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[0, [1, 4, 5]], mask[1, [0, 15]], mask[2, [2, 3, 7, 9]] = True, True, True
    selected = beit.loss(beit([tokens], [codes], mask))  # no data_views: boolean selection
    beit.mask_slots = 4
    slotted = beit([tokens], [codes], mask)
    assert slotted["logits"].shape == (3, 4, 7) and slotted["weights"].sum().item() == 9
    for key, value in beit.loss(slotted).items():
        assert value.item() == pytest.approx(selected[key].item(), rel=1e-6), key
    beit.mask_slots = 3  # image 2 has 4 masked patches: refused, not silently cut
    with pytest.raises(RuntimeError, match="more patches than its generator's target"):
        beit([tokens], [codes], mask)


@pytest.mark.parametrize("recipe, overrides", [
    ("slip_simclr", ()),
    ("slip_mocov3", ()),
    ("slip_byol", ()),
    ("slip_swav", ()),
    ("slip_mocov2", ()),
    ("relicv2", ("objective.relic_saliency_p=1.0",)),  # every large crop masked, the mask estimated on the "device"
    ("pirl", ()),
    ("amdim", ()),
    ("cpc", ()),
    ("yadim", ()),
])
def test_a_training_step_reads_no_device_value_before_its_update(monkeypatch, corpus, tmp_path, recipe, overrides):
    assert reads_in_third_step(monkeypatch, corpus, tmp_path / "run", recipe, *overrides) == []


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("recipe, overrides", [
    ("slip_simclr", ()), ("slip_swav", ()), ("slip_mocov2", ()), ("pirl", ()), ("amdim", ()), ("yadim", ()),
    ("relicv2", ("objective.relic_saliency_p=1.0",)),
])
def test_on_a_gpu_a_training_step_synchronises_nowhere_before_its_update(monkeypatch, corpus, tmp_path, recipe,
                                                                          overrides):
    # What the dispatch-mode stand-in above checks on the CPU, checked by CUDA itself; the JPEGs are
    # decoded in the workers (nvJPEG's own synchronisation is torchvision's, not slip's).
    syncs = reads_in_third_step(monkeypatch, corpus, tmp_path / "run", recipe, "data.decode=workers", *overrides,
                                recorder=CudaSyncs())
    assert syncs == []


def test_the_recorder_sees_a_scalar_read_and_a_data_dependent_size(monkeypatch, corpus, tmp_path):
    # The stand-in must fail when a step does read: plant two reads in the loss.
    from slip import losses

    simclr = losses.simclr_loss

    def reading(z1, z2, *args, **kwargs):
        float(z1.detach().sum())
        torch.unique(z1.argmax(dim=1))
        return simclr(z1, z2, *args, **kwargs)

    monkeypatch.setattr(losses, "simclr_loss", reading)
    import slip.ssl.simclr as simclr_module

    monkeypatch.setattr(simclr_module, "simclr_loss", reading)
    sites = reads_in_third_step(monkeypatch, corpus, tmp_path / "run", "slip_simclr")
    assert [s.split(" at ")[0] for s in sites] == ["_local_scalar_dense", "_unique2"]


def test_host_copies_of_counters_follow_their_buffers_through_updates_and_loads():
    import slip
    from slip.models import get_architecture

    model = slip.create_model(get_architecture("simclr_vit_tiny").with_ssl_method("relicv2"))
    ssl = model.ssl
    assert ssl.host_count("num_updates") == 0
    for _ in range(3):
        ssl.advance_count("num_updates")
    assert ssl.host_count("num_updates") == 3 and int(ssl.num_updates) == 3
    state = model.state_dict()
    state["ssl.num_updates"] = torch.tensor(41)
    model.load_state_dict(state)  # a resume: the checkpoint's count, not the host copy's
    assert ssl.host_count("num_updates") == 41
    ssl.advance_count("num_updates", 5, limit=44)
    assert ssl.host_count("num_updates") == int(ssl.num_updates) == 44


def test_a_steps_logged_values_come_back_exact_from_one_read():
    from slip.train.trainer import _to_floats

    values = {"loss": torch.tensor(2.718281, dtype=torch.float32), "count": torch.tensor(2**40 + 1),
              "half": torch.tensor(0.1, dtype=torch.bfloat16), "lr": 3e-4, "steps": 7}
    out = _to_floats(values)
    assert list(out) == list(values) and all(type(v) is float for v in out.values())
    assert out["loss"] == float(values["loss"]) and out["count"] == 2**40 + 1
    assert out["half"] == float(values["half"]) and (out["lr"], out["steps"]) == (3e-4, 7.0)


def test_host_data_reaches_the_device_with_its_values_and_dtype():
    from slip.runtime import host_to_device

    t = host_to_device([[1, 2], [3, 4]], "cpu", torch.float64)
    assert t.dtype == torch.float64 and t.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    source = torch.arange(5)
    assert host_to_device(source, torch.device("cpu")) is source  # already there: no copy
    assert host_to_device(source, None, torch.float32).tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_host_data_is_copied_without_synchronising():
    from slip.runtime import host_to_device

    torch.cuda.set_sync_debug_mode("error")
    try:
        t = host_to_device([0.5, 1.5, 2.5], "cuda", torch.float32)
        u = host_to_device(torch.arange(4), torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert t.device.type == "cuda" and t.cpu().tolist() == [0.5, 1.5, 2.5] and u.cpu().tolist() == [0, 1, 2, 3]
