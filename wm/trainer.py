"""One trainer for every trainable model in the project: world models and policies alike.

The entry point builds the model, the dataset and the normalizer and passes them in (nothing here
reads a root config or instantiates from one). A model only has to satisfy `TrainableModel`:

    loss, metrics = model.compute_loss(batch)   # batch: the WindowDataset keys, on the device

The trainer owns everything else: the seeded loader (`wm.data.dataset.make_loader`), AdamW with weight
decay on layers' weight matrices only (`wm.optim.decayed_matrices`), linear warmup then cosine LR (the
warm-up capped at a fraction of the run, so a short run is not all warm-up), gradient clipping, an EMA
copy of the weights (used for validation and saved), optional bf16 autocast and `torch.compile`, tqdm
progress, TensorBoard logs under `out_dir/tb`, periodic validation through a model-specific `val_fn`,
atomic checkpoints (`wm.checkpoint`): the latest `ckpt_<step>.pt` files and `best.pt`, the weights with
the lowest validation metric so far; resuming from the latest checkpoint in `out_dir`, and on Ctrl-C a
checkpoint at the step reached (`TrainingInterrupted`). What a user must see (resuming, the warm-up cap,
validation, the interrupt) is printed to stderr on rank 0 above the progress bar.

DDP: launched with `torchrun`, the trainer sees WORLD_SIZE > 1, joins the process group (nccl on
CUDA, gloo on CPU) and wraps the model in `DistributedDataParallel`. DDP only syncs gradients for a
call through its own `forward`, so the model is wrapped in `_LossForward`, whose `forward` *is*
`compute_loss`; calling `model.compute_loss` directly would bypass the gradient all-reduce. Each rank
reads its own shard of the data; rank 0 alone logs, validates and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from wm import kernels, resume
from wm.checkpoint import (
    BEST_NAME,
    CheckpointError,
    checkpoint_name,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from wm.data.dataset import make_loader
from wm.data.normalize import Normalizer
from wm.interrupt import InterruptFlag, TrainingInterrupted
from wm.locks import held
from wm.optim import (
    TrainerConfig,
    adamw,
    check_device,
    default_param_groups,
    ema_decay_at,
    ema_update,
    lr_factor,
)
from wm.options import is_whole

__all__ = [
    "Trainer",
    "TrainerConfig",
    "TrainableModel",
    "TrainingInterrupted",
    "default_param_groups",
    "ema_decay_at",
    "ema_update",
    "lr_factor",
    "pick_device",
]

log = logging.getLogger(__name__)
ValFn = Callable[[nn.Module, int, Path], dict[str, float]]


@runtime_checkable
class TrainableModel(Protocol):
    """An `nn.Module` with `compute_loss(batch) -> (scalar loss, metrics)`. Metric values may be floats
    or 0-d tensors (tensors are averaged over the log window without a device sync every step)."""

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]: ...


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """ "auto" -> CUDA if available else CPU; a bare "cuda" is `cuda:<local_rank>` (one GPU per DDP rank)."""
    check_device(name, "device")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {name!r} was asked for but CUDA is not available (use device=cpu or auto)"
            )
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {dev} does not exist ({torch.cuda.device_count()} CUDA devices)")
    return dev


class _LossForward(nn.Module):
    """Makes `compute_loss` the module's `forward`, so DDP and torch.compile see the loss call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        return self.model.compute_loss(batch)


def _seed_everything(seed: int) -> None:
    """Reseed the global Python, NumPy and torch generators (see `Trainer`: deliberate)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _Window:
    """Running sums over one logging window, synced to the host only when read."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor | float] = {}
        self.n = 0
        self.t0 = time.perf_counter()

    def add(self, values: dict[str, Tensor | float]) -> None:
        for k, v in values.items():
            v = v.detach().float() if isinstance(v, Tensor) else float(v)
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.n += 1

    def means(self) -> dict[str, float]:
        return {k: float(v) / self.n for k, v in self.sums.items()}


def worker_error(e: Exception) -> Exception:
    """`e`, re-raised by torch from a DataLoader worker, as the worker raised it: torch gives the same type
    with the worker's whole traceback as the message (a one-line refusal, e.g. a NaN frame named by
    store, episode and step, became 20 lines the apps flattened into one); `e` itself otherwise."""
    text, kind = str(e), type(e)
    if not text.startswith("Caught ") or "DataLoader worker" not in text:
        return e
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    at = text.rfind(f"\n{name}: ")  # the traceback's last line: the worker's exception and its message
    if at < 0:
        return e
    try:
        return kind(text[at + len(name) + 3 :].strip())
    except Exception:  # a type that takes other arguments: keep torch's
        return e


class TrainingDiverged(ValueError):
    """The loss or the weights stopped being finite; nothing non-finite is saved (a ValueError: the
    apps say it in one line, with what to change)."""


def _stop_message(signum: int) -> str:
    name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    return f"{name}: stopping after this step to save a checkpoint ({name} again: quit unsaved)"


class Trainer:
    """Trains `model` on `train_set` (a `WindowDataset`) for `cfg.steps` optimizer steps into `out_dir`.

    `model_type` / `model_config` name the builder that rebuilds the model from a checkpoint.
    `normalizer` is saved in every checkpoint. `val_fn(ema_model, step, out_dir) -> metrics` runs on
    rank 0 every `cfg.val_every` steps and at the end (under `torch.no_grad`, model in eval mode); its
    metrics are losses (lower is better) and `cfg.best_metric` among them chooses `best.pt`.
    `extra_state` is saved as the checkpoint's "extra"; its "run_config" also goes into config.json.
    `param_groups` replaces the default AdamW groups (lr and weight decay default to `cfg`'s).
    `same_on_resume(then, now)` says what differs between a checkpoint's `extra_state["run_config"]` and
    this run's in what a resumed run must keep (the data: its fingerprint, split seed and ratio), one
    "key old -> new" string each (`wm.resume.changed_entries`); by default nothing is compared.
    `single_process`: train in this process alone whatever WORLD_SIZE says (the default autoencoder of a
    DDP run: one rank trains it under a lock while the others wait to reuse it; as one of the world it
    waited in `init_process_group` for ranks that waited on the lock). The model is put in train mode;
    one with frozen parts that must stay in eval mode (a pretrained encoder with batch norm) overrides
    `train()` to keep them there.

    Global random state: the constructor reseeds Python's `random`, NumPy's global generator and
    torch's (CPU and CUDA) with `cfg.seed + rank`, and `resume()` restores the states a checkpoint
    saved. This is deliberate: dropout, augmentation and noise sampling inside `compute_loss` draw
    from the global generators, and a run is reproducible (and resumable) only if the trainer owns
    them. Build the trainer after anything that must draw from them unaffected.
    """

    def __init__(
        self,
        model: nn.Module,
        train_set: Any,
        cfg: TrainerConfig,
        out_dir: str | os.PathLike,
        *,
        model_type: str,
        model_config: dict[str, Any],
        normalizer: Normalizer | None = None,
        val_fn: ValFn | None = None,
        extra_state: dict[str, Any] | None = None,
        param_groups: list[dict[str, Any]] | None = None,
        same_on_resume: Callable[[dict[str, Any], dict[str, Any]], list[str]] | None = None,
        single_process: bool = False,
    ) -> None:
        if not isinstance(model, TrainableModel):
            raise TypeError(f"{type(model).__name__} has no compute_loss(batch) -> (loss, metrics)")
        json.dumps(model_config)  # fails early, not at the first checkpoint, if it is not JSON-able
        self.cfg, self.out_dir, self.val_fn = cfg, Path(out_dir), val_fn
        self.model_type, self.model_config = model_type, dict(model_config)
        self.normalizer, self.extra_state = normalizer, dict(extra_state or {})
        self.same_on_resume = same_on_resume
        self.world_size = 1 if single_process else int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0")) if self.world_size > 1 else 0
        self._device = pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
        if self._device.type == "cuda":
            torch.cuda.set_device(self._device)
        self._owns_group = self.world_size > 1 and not dist.is_initialized()
        if self._owns_group:
            dist.init_process_group("nccl" if self._device.type == "cuda" else "gloo")
        _seed_everything(cfg.seed + self.rank)
        self.is_main = self.rank == 0

        self.model = model.to(self._device).train()
        self._ema = copy.deepcopy(self.model).requires_grad_(False).eval() if cfg.ema_decay > 0 else None
        groups = param_groups if param_groups is not None else default_param_groups(model, cfg.weight_decay)
        self._grouped = model if param_groups is None else None  # (a checkpoint's groups may be regrouped)
        self.optimizer = adamw(groups, cfg, self._device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.loader = make_loader(
            train_set,
            cfg.batch_size,
            shuffle=True,
            num_workers=cfg.num_workers,
            seed=cfg.seed,
            drop_last=True,
            rank=self.rank,
            world_size=self.world_size,
        )
        if len(self.loader) == 0:
            raise ValueError(
                f"{len(train_set)} training windows over {self.world_size} rank(s) make no full batch of "
                f"{cfg.batch_size}"
            )
        loss_module: nn.Module = _LossForward(self.model)
        if self.world_size > 1:
            ids = [self._device.index] if self._device.type == "cuda" else None
            loss_module = DistributedDataParallel(loss_module, device_ids=ids)  # broadcasts rank 0's weights
            if self._ema is not None:
                self._ema.load_state_dict(self.model.state_dict())
        if cfg.compile and self._device.type == "cuda":
            loss_module = torch.compile(loss_module)
        elif cfg.compile:
            self._say(f"note: compile=true is used on CUDA only; this run on {self._device} is not compiled")
        if cfg.precision == "bf16" and self._device.type == "cpu":
            log.info("bf16 autocast on CPU: numerically fine but slow on most CPUs")
        self._loss_fn = loss_module
        self.step, self.epoch = 0, 0
        # where the data stands: the loader generator's state when this epoch began and how many of its
        # batches were taken, so a resume continues the epoch (`_batches`); a resume's batches to skip
        self._epoch_start: Tensor | None = None
        self._epoch_batches = 0
        self._skip = 0
        self.best: dict[str, Any] | None = None  # {"metric", "value", "step"} of best.pt
        self._trains = True  # False: resumed at or past cfg.steps (`_start`), config.json is not this run's

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def ema_model(self) -> nn.Module:
        """The EMA copy of the model, or the model itself when EMA is off."""
        return self._ema if self._ema is not None else self.model

    def _say(self, message: str) -> None:
        """Print a line a user must see (rank 0, stderr, above the progress bar); "" says nothing."""
        if self.is_main and message:
            tqdm.write(message, file=sys.stderr)

    # ------------------------------------------------------------------ checkpoints
    def _payload(self, resumable: bool = True) -> dict[str, Any]:
        """The checkpoint fields; `resumable=False` leaves out optimizer, scheduler and rng (best.pt)."""
        fields = dict(
            model_type=self.model_type,
            model_config=self.model_config,
            state_dict=self.model.state_dict(),
            ema_state_dict=self._ema.state_dict() if self._ema is not None else None,
            normalizer=self.normalizer.to_dict() if self.normalizer is not None else None,
            trainer_config=self.cfg.to_dict(),
            step=self.step,
            epoch=self.epoch,
            extra=self.extra_state,
            best=self.best,
        )
        if resumable:
            fields.update(
                optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(),
                rng=rng_state(self.loader.generator),
                data_position={
                    "epoch_start": self._epoch_start,
                    "batches": self._epoch_batches,  # (each process's)
                    "world_size": self.world_size,
                },
            )
        return fields

    def save(self) -> Path | None:
        """Write `out_dir/ckpt_<step>.pt` (rank 0 only) and prune to `cfg.keep_last` files. Weights that
        are not finite are never written (nor good checkpoints pruned for them): every rank, whose
        weights are the same, raises `TrainingDiverged`."""
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            raise TrainingDiverged(
                f"the weights are not finite at step {self.step}: training diverged and was not saved; "
                "lower trainer.lr or set trainer.grad_clip (the checkpoints saved before are kept)"
            )
        if not self.is_main:
            return None
        path = save_checkpoint(self.out_dir / checkpoint_name(self.step), **self._payload())
        prune_checkpoints(self.out_dir, self.cfg.keep_last)
        return path

    def resume(self) -> bool:
        """Restore the latest checkpoint in `out_dir`, if any: weights, EMA, optimizer, scheduler, step,
        random states and the best validation so far. The data continues the checkpoint's epoch past
        the batches it had taken (`_continue_epoch`), so a run on one process with `num_workers=0`
        trains as the unbroken one would have (loader workers' augmentation draws differ after a
        resume). Under DDP only rank 0's random state is saved; other ranks reseed from (seed, rank,
        step). A checkpoint of another model type or architecture is a
        one-line `CheckpointError`, as is one trained on other data (`same_on_resume`); another
        model_config whose weights fit is said and resumed. The optimizer's moments come from the
        checkpoint, its settings (lr, betas, weight decay) from this run's, as config.json records; so
        does the learning-rate schedule (steps, warm-up), said when it differs from the checkpoint's."""
        path = latest_checkpoint(self.out_dir)
        run = resume.RunIdentity(
            self.out_dir,
            self.model,
            self.model_type,
            self.model_config,
            self.extra_state.get("run_config") or {},
            self.same_on_resume,
        )
        if path is None:
            self.best = self._orphan_best(run)
            return False
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as e:  # wm-train resumes the newest: say how to reach the one before it
            raise CheckpointError(f"{e}; {resume.fall_back(self.out_dir, path)}") from None
        self._say(resume.check_fits(run, ckpt, path))
        then = ckpt.get("trainer_config") if isinstance(ckpt.get("trainer_config"), dict) else {}
        seed = then.get("seed")
        if is_whole(seed) and seed != self.cfg.seed:  # it was ignored, and config.json said it was used
            raise CheckpointError(
                f"{path}: trained with trainer.seed={seed}, this run has trainer.seed={self.cfg.seed}: a "
                f"resumed run continues the checkpoint's random state; resume with trainer.seed={seed}, or "
                f"give another out= to train with seed {self.cfg.seed} from the start"
            )
        self.model.load_state_dict(ckpt["state_dict"])
        if self._ema is not None:
            self._ema.load_state_dict(ckpt["ema_state_dict"] or ckpt["state_dict"])
        if self.normalizer is not None:
            resume.restore_rule(ckpt.get("normalizer"), path, [self.normalizer, self.model, self._ema])
        settings = resume.optimizer_settings(self.optimizer)
        fix = resume.fall_back(self.out_dir, path)
        try:
            saved = ckpt["optimizer"]
            if self._grouped is not None:
                saved = resume.regrouped(saved, self.optimizer, self._grouped)
            self.optimizer.load_state_dict(saved)
            resume.check_moments(self.optimizer)
        except resume.DAMAGED as e:
            raise CheckpointError(
                f"{path}: its optimizer state does not fit this run's parameters ({e}); {fix}"
            ) from None
        try:  # a damaged file: one line, not a KeyError or TypeError from deep in torch
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self._say(resume.keep_settings(self.optimizer, self.scheduler, settings))
            self._say(resume.schedule_note(self.cfg, ckpt.get("trainer_config"), self.scheduler.last_epoch))
            self._say(resume.step_note(self.cfg, then))
            self.step, self.epoch = int(ckpt["step"]), int(ckpt["epoch"]) + 1
            if self.rank == 0:
                set_rng_state(ckpt["rng"], self.loader.generator)
            else:
                _seed_everything(self.cfg.seed + self.rank + 1_000_003 * self.step)
            self._continue_epoch(ckpt.get("data_position"), int(ckpt["epoch"]), then.get("batch_size"))
        except resume.DAMAGED as e:
            raise CheckpointError(
                f"{path}: its scheduler, step or random state is damaged ({type(e).__name__}: {e}); {fix}"
            ) from None
        self.best = resume.recorded_best(self.out_dir, ckpt)
        self._say(f"resumed from step {self.step} ({path})")
        return True

    def _continue_epoch(self, position: Any, epoch: int, batch_size: Any = None) -> None:
        """Continue the checkpoint's epoch past the batches it had taken: the loader generator back at
        the epoch's start (rank 0's; other ranks' shards follow from the epoch), those batches skipped.
        A checkpoint without the position (an older version's) starts a fresh epoch. Taken with another
        `batch_size`, its batches are counted in windows: this run's batches skip as many as whole ones
        cover (a larger batch size was called a damaged checkpoint, a smaller one skipped windows the run
        had never taken). Taken by another number of processes, the epoch's order is another (each
        process's shard, and one process's own order): a new epoch begins, and a note says so (the
        positions of each process's shard were read as this run's: a damaged checkpoint, or wrong windows
        skipped)."""
        then = position.get("world_size") if isinstance(position, dict) else None
        if is_whole(then) and then != self.world_size:
            self._say(
                f"note: the checkpoint was trained on {then} process(es), this run on {self.world_size}: its "
                f"epoch {epoch} cannot be continued in the same order, so epoch {epoch + 1} begins"
            )
            return
        if (
            is_whole(batch_size)
            and batch_size != self.cfg.batch_size
            and isinstance(position, dict)
            and is_whole(position.get("batches"))
        ):
            windows = position["batches"] * batch_size
            position = {**position, "batches": min(windows // self.cfg.batch_size, len(self.loader))}
            self._say(
                f"note: the checkpoint took batches of {batch_size}, this run takes {self.cfg.batch_size}: "
                f"its epoch goes on after window {position['batches'] * self.cfg.batch_size} of the "
                f"{windows} it had taken"
            )
        batches = resume.batches_taken(position, len(self.loader))
        if batches is None:
            return
        if self.rank == 0:
            self.loader.generator.set_state(position["epoch_start"])
        self.epoch, self._skip = epoch, batches

    def _orphan_best(self, run: resume.RunIdentity) -> dict[str, Any] | None:
        """A best.pt in `out_dir` without a checkpoint to resume from (a run killed before its first
        one): its record is the bar a new validation must beat to replace it (a rerun of the command
        replaced a better best.pt with its first validation), and the run says so. One of another
        model, architecture or data is refused as a checkpoint to resume is (it was taken as the bar,
        and kept as this run's best)."""
        best_path = self.out_dir / BEST_NAME
        if not best_path.is_file():
            return None
        ckpt = load_checkpoint(best_path)
        resume.check_same_run(run, ckpt, best_path)
        best = resume.recorded_best(self.out_dir, ckpt)
        if best is not None:
            self._say(
                f"note: {self.out_dir} holds {BEST_NAME} ({best['metric']} {best['value']:.4g} at step "
                f"{best['step']}) and no checkpoint to resume from: training starts at step 0, and "
                f"{BEST_NAME} is replaced only by a better validation"
            )
        return best

    # ------------------------------------------------------------------ training
    def _on_device(self, v: Any) -> Any:
        """A batch's tensor on the device; raw uint8 frames (a dataset's `image_dtype="uint8"`, a quarter
        of the bytes from the loader's workers) as the float [0, 1] frames every model reads."""
        if not isinstance(v, Tensor):
            return v
        v = v.to(self._device, non_blocking=True)
        return v.float().div_(255) if v.dtype == torch.uint8 and v.dim() >= 4 else v

    def _batches(self) -> Iterator[dict[str, Tensor]]:
        """Endless batches on the device, epoch after epoch (reshuffling DDP shards each epoch, and telling
        a dataset that draws its own windows, `MixedWindows`, which epoch it is in)."""
        while True:
            self.loader.sampler.set_epoch(self.epoch)  # `ResumableBatches`
            self._epoch_start = self.loader.generator.get_state()
            self.loader.sampler.skip = self._epoch_batches = self._skip  # `ResumableBatches`
            self._skip = 0
            try:
                for batch in self.loader:
                    self._epoch_batches += 1
                    yield {k: self._on_device(v) for k, v in batch.items()}
            except Exception as e:  # a bad frame met mid-run, by a worker: its own line, not the traceback
                original = worker_error(e)
                if original is e:
                    raise
                raise original from e
            self.epoch += 1

    def train_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor | float]:
        """One optimizer step on a device batch; returns loss, metrics, grad_norm, lr (unsynced)."""
        lr = self.optimizer.param_groups[0]["lr"]
        with torch.autocast(self._device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16"):
            loss, metrics = self._loss_fn(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm, norms = self._clip_gradients()
        self._check_finite(loss.detach(), grad_norm, norms)
        self.optimizer.step()
        self.scheduler.step()
        if self._ema is not None:
            ema_update(self._ema, self.model, ema_decay_at(self.step, self.cfg))
        self.step += 1
        return {"loss": loss.detach(), **metrics, "grad_norm": grad_norm, "lr": lr}

    def _clip_gradients(self) -> tuple[Tensor, list[Tensor]]:
        """Clip each clip group (see `default_param_groups`) to `grad_clip` on its own; returns the
        gradient norm of the main group (the parameters of no detached head) and every group's norm."""
        by_group: dict[str, list[Tensor]] = {}
        for g in self.optimizer.param_groups:
            by_group.setdefault(g.get("clip_group", ""), []).extend(g["params"])
        limit = self.cfg.grad_clip or float("inf")
        norms = {name: nn.utils.clip_grad_norm_(ps, limit) for name, ps in by_group.items()}
        return (norms[""] if "" in norms else next(iter(norms.values()))), list(norms.values())

    def _check_finite(self, loss: Tensor, grad_norm: Tensor, norms: list[Tensor]) -> None:
        """Raise `TrainingDiverged` before the optimizer step when the loss or a gradient norm is NaN or
        inf: clipping a NaN norm makes every gradient NaN, and the step would put NaN into the weights,
        the EMA and the optimizer (a validation before the next logging step could then save them as
        best.pt). One device sync a step, on one scalar. Under DDP the loss is each rank's own (one
        rank stopping alone would leave the others waiting); the gradients, all-reduced, are the same
        on every rank, so every rank stops at the same step (a non-finite loss with finite gradients is
        caught at the next logging step, on the ranks' mean)."""
        total = loss.float() if self.world_size == 1 else torch.zeros((), device=loss.device)
        for norm in norms:
            total = total + norm.to(total.device)
        if bool(torch.isfinite(total)):
            return
        raise TrainingDiverged(
            f"the loss is {float(loss):.4g} and the gradient norm {float(grad_norm):.4g} at step "
            f"{self.step + 1}: training diverged; the step was not taken and nothing was saved; lower "
            "trainer.lr or set trainer.grad_clip (the checkpoints saved before are kept)"
        )

    def validate(self) -> dict[str, float]:
        """Run `val_fn` on the EMA model (rank 0 only); returns its metrics. CPU kernels are PyTorch's
        own here, not chosen by timing (`wm.kernels`): two runs of one config validate alike, so they
        keep the same best.pt (timed choices moved the metric in its fourth digit between processes).
        The random states are restored after it, so validating (or `val_every`) changes no training
        step, and a run resumed from a checkpoint saved before a validation trains as the unbroken one."""
        if self.val_fn is None or not self.is_main:
            return {}
        model = self.ema_model
        was_training = model.training
        model.eval()
        state = rng_state()  # what validation draws never moves training's random streams
        try:
            with torch.no_grad(), kernels.mode("native"):
                metrics = self.val_fn(model, self.step, self.out_dir)
        finally:
            set_rng_state(state)
        model.train(was_training)
        return {k: float(v) for k, v in (metrics or {}).items()}

    def _write_config(self) -> None:
        """`out_dir/config.json`: the settings, the warm-up used and the best validation so far (rewritten
        atomically when best.pt is). A run that trains nothing (resumed at or past `steps`) updates only
        the best validation of the config.json its checkpoints were trained under."""
        best = self.best | {"file": BEST_NAME} if self.best is not None else None
        path = self.out_dir / "config.json"
        if not self._trains and path.exists():
            with contextlib.suppress(OSError, ValueError, TypeError):  # unreadable: written afresh
                kept = json.loads(path.read_text())
                kept["best"] = best
                self._replace_config(kept)
                return
        run = {
            "trainer": self.cfg.to_dict(),
            "warmup_steps_used": self.cfg.warmup_steps_used,
            "model_type": self.model_type,
            "model_config": self.model_config,
            "run_config": self.extra_state.get("run_config"),
            "world_size": self.world_size,
            "best": best,
        }
        self._replace_config(run)

    def _replace_config(self, run: dict[str, Any]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.out_dir / f".config.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(run, indent=1, default=str))
        os.replace(tmp, self.out_dir / "config.json")

    def _keep_best(self, metrics: dict[str, float]) -> str:
        """Rewrite best.pt (and config.json) when `cfg.best_metric` beats every earlier validation;
        returns what to say about it ("" when nothing changed)."""
        if not metrics or self.cfg.best_metric is None:
            return ""
        name = next(iter(metrics)) if self.cfg.best_metric == "auto" else self.cfg.best_metric
        if name not in metrics:
            saved = self.save()  # the steps trained so far are kept: rerun with a right name to resume
            raise ValueError(
                f"best_metric={name!r} is not a validation metric of this model ({', '.join(metrics)}); "
                f"name one of those, 'auto' (the first) or null (no best.pt); step {self.step} is saved"
                + (f" ({saved})" if saved is not None else "")
            )
        value, old = metrics[name], self.best
        if not math.isfinite(value) or (old and old["metric"] == name and value >= old["value"]):
            return ""
        self.best = {"metric": name, "value": value, "step": self.step}
        save_checkpoint(self.out_dir / BEST_NAME, **self._payload(resumable=False))
        self._write_config()
        return f"  -> best {name} so far, saved {BEST_NAME}"

    def _validate(self, writer: Any) -> dict[str, float]:
        """Validate, log to TensorBoard, keep the best, say it; returns the metrics as "val/<name>"."""
        metrics = self.validate()
        out = {f"val/{k}": v for k, v in metrics.items()}
        if writer is not None:
            for k, v in out.items():
                writer.add_scalar(k, v, self.step)
        note = self._keep_best(metrics)
        if out:
            self._say(f"step {self.step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()) + note)
        return out

    def _start(self) -> Any:
        """Rank 0, before the first step: config.json, the TensorBoard writer, the warm-up cap if any. A
        run resumed at or past `steps` trains nothing, so its settings do not replace config.json's."""
        self._trains = self.step < self.cfg.steps
        if not self.is_main:
            return None
        from torch.utils.tensorboard import SummaryWriter  # slow import, only where it is used

        cfg = self.cfg
        if not self._trains:
            self._say(
                f"note: {self.out_dir} holds step {self.step} and trainer.steps={cfg.steps}: nothing to "
                f"train (give trainer.steps above {self.step} to train on); config.json is kept as it was"
            )
            return SummaryWriter(str(self.out_dir / "tb"))
        if cfg.warmup_steps_used < cfg.warmup_steps:
            self._say(
                f"warm-up: {cfg.warmup_steps_used} steps, not warmup_steps={cfg.warmup_steps}: capped at "
                f"warmup_max_fraction={cfg.warmup_max_fraction} of steps={cfg.steps} "
                f"(warmup_max_fraction=1 keeps {cfg.warmup_steps})"
            )
        self._write_config()
        # steps past the checkpoint a killed run had logged are hidden: they are logged again (twice, the
        # curves zigzagged)
        return SummaryWriter(str(self.out_dir / "tb"), purge_step=self.step + 1)

    def fit(self) -> dict[str, float]:
        """Train to `cfg.steps` (resuming from `out_dir` if it holds a checkpoint); returns the last log
        window's mean train metrics (averaged over DDP ranks), the last validation metrics ("val/..."), and
        "step". Under DDP, a process group the trainer joined itself is left when fit returns.

        Ctrl-C (SIGINT) or SIGTERM (a scheduler preempting the job), main thread: training stops at the
        end of the step in progress, rank 0 saves a checkpoint of it and `TrainingInterrupted` (a
        KeyboardInterrupt) is raised; a second signal quits at once without saving. Under DDP the
        ranks agree to stop at the next logging step.

        Two runs into one `out_dir` at once are refused (BusyError): each pruned and replaced the other's
        checkpoints, and both said they had finished."""
        guard = contextlib.ExitStack()
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            busy = (
                f"{self.out_dir}: another training is writing its checkpoints into this folder; wait for it "
                "to end, or give this run another out="
            )
            guard.enter_context(held(self.out_dir, busy))
        with guard:
            return self._fit()

    def _fit(self) -> dict[str, float]:
        self.resume()
        writer = self._start()
        pbar = tqdm(total=self.cfg.steps, initial=self.step, disable=not self.is_main, dynamic_ncols=True)
        data = self._batches()
        try:
            with InterruptFlag(_stop_message if self.is_main else None) as interrupt:
                result = self._loop(data, writer, pbar, interrupt)
            if self._owns_group:
                dist.barrier()  # not on an error: the other ranks may never get here
        finally:
            data.close()
            pbar.close()
            if writer is not None:
                writer.close()
            if self._owns_group:
                dist.destroy_process_group()
                self._owns_group = False
        return result | {"step": float(self.step)}

    def _loop(self, data: Iterator, writer: Any, pbar: tqdm, interrupt: InterruptFlag) -> dict[str, float]:
        cfg, result, window, last_val = self.cfg, {}, _Window(), -1
        while self.step < cfg.steps:
            try:
                batch = next(data)
            except RuntimeError:  # DataLoader workers quit on a terminal's Ctrl-C (their SIGINT)
                if not interrupt.requested:
                    raise
                self._stop(saved=False, signum=interrupt.signum)
            window.add(self.train_step(batch))
            pbar.update(1)
            at_log = self.step % cfg.log_every == 0 or self.step == cfg.steps
            if at_log:
                result.update(self._log(window, writer, pbar))
                window = _Window()
            saved = bool(cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or self.step == cfg.steps
            if saved:  # before validating: a failing val_fn loses no training
                self.save()
            if (cfg.val_every and self.step % cfg.val_every == 0) or self.step == cfg.steps:
                result.update(self._validate(writer))
                last_val = self.step
            if at_log:  # the next window times training steps only (not this step's save and validation)
                window.t0 = time.perf_counter()
            if self.step < cfg.steps and self._stop_requested(interrupt, at_log):  # the last: done
                self._stop(saved, interrupt.signum)
        if last_val != self.step and self.val_fn is not None:  # resumed at or past cfg.steps
            result.update(self._validate(writer))
        return result

    def _stop_requested(self, interrupt: InterruptFlag, at_log: bool) -> bool:
        """Whether to stop after this step. Under DDP every rank must stop at the same step, so they
        agree (one all-reduce) at logging steps only, which every rank reaches together."""
        if self.world_size == 1:
            return interrupt.requested
        if not at_log:
            return False
        flag = torch.tensor([float(interrupt.requested)], device=self._device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _stop(self, saved: bool, signum: int) -> NoReturn:
        """Save the step reached (unless just saved) and raise `TrainingInterrupted`."""
        path = self.save() if not saved else self.out_dir / checkpoint_name(self.step)
        if self.is_main:
            self._say(f"interrupted at step {self.step}: saved {path}")
        raise TrainingInterrupted(self.step, path if self.is_main else None, signum)

    def _log(self, window: _Window, writer: Any, pbar: tqdm) -> dict[str, float]:
        means = window.means()
        if self.world_size > 1:  # every rank logs at the same steps, so this collective is safe
            keys = sorted(means)
            t = torch.tensor([means[k] for k in keys], dtype=torch.float64, device=self._device)
            dist.all_reduce(t)
            means = {k: v / self.world_size for k, v in zip(keys, t.tolist(), strict=True)}
        if not math.isfinite(means["loss"]):
            raise TrainingDiverged(
                f"the loss is {means['loss']} at step {self.step}: training diverged; lower trainer.lr or "
                "set trainer.grad_clip (the checkpoints saved before are kept)"
            )
        elapsed = time.perf_counter() - window.t0
        means["samples_per_s"] = window.n * self.cfg.batch_size * self.world_size / max(elapsed, 1e-9)
        if writer is not None:
            for k, v in means.items():
                writer.add_scalar(f"train/{k}", v, self.step)
        sps = means["samples_per_s"]
        pbar.set_postfix(loss=f"{means['loss']:.4g}", lr=f"{means['lr']:.2e}", sps=f"{sps:.0f}")
        return means
