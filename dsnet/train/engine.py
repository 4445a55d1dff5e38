"""The training loop shared by both stages: devices, DDP, AMP, optimizer steps, EMA, logging,
validation, checkpoints and exact resume.

A stage supplies a *step* (``step(x, y, generator, backward) -> {"loss", "losses", ...}``) that
runs its forwards and calls ``backward`` per loss, and an *evaluate* function returning an
``Evaluation`` (typed: its ``best_metric`` ranks ``best.pth``, or is None when the stage keeps
``last.pth`` only). The loop's settings are keyword arguments, fed from the config's ``train`` and
``output`` sections by ``loop_kwargs(cfg)`` as timm's ``optimizer_kwargs(cfg)`` feeds its
optimizer factory. The loop owns
everything else: gradient accumulation, clipping, the optimizer/scheduler/EMA updates, the
progress bar, the logs (``dsnet.train.logs``: ``metrics.jsonl``, ``summary.csv``, TensorBoard) and
atomic checkpoints.
"""
from __future__ import annotations

import contextlib
import datetime
import io
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from dsnet.config import Config, apply_overrides, config_from_dict, config_to_dict, load_config, replace, save_config
from dsnet.errors import UserError
from dsnet.train.checkpoint import build_model, read_checkpoint, rng_state, save_checkpoint, set_rng_state
from dsnet.train.logs import RunLog, check_tensorboard, progress_bar

__all__ = ["Runtime", "resolve_device", "setup_runtime", "close_runtime", "autocast_factory", "prepare_run_dir", "Loop",
           "loop_kwargs", "Evaluation", "TrainingError", "route_generator", "epoch_seed", "cudnn_autotune", "checkpoint_run",
           "load_run", "resume_changes", "check_resume_target", "check_resumed_classes", "record_config",
           "updates_per_epoch", "RESUME_FREE", "UNREAD_BY_STAGE"]

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, lost peer); the last good checkpoint is kept."""


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    deterministic: bool = False   # train.deterministic: no cuDNN autotuning, deterministic kernels

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(spec: str, world_size: int = 1, local_rank: int = 0) -> torch.device:
    """The device ``train.device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) names for this process.

    One process: ``auto`` is the current CUDA device when there is one, else the CPU; ``cuda`` is
    the current CUDA device; ``cuda:N`` that GPU. Under torchrun (``world_size`` > 1) each process
    takes the GPU of its ``local_rank``, so ``auto`` and ``cuda`` mean ``cuda:LOCAL_RANK`` and a
    fixed ``cuda:N`` is refused. A CUDA device always carries its index (``torch.cuda.set_device``
    needs one)."""
    if spec not in ("auto", "cpu", "cuda") and not (spec.startswith("cuda:") and spec[5:].isdigit()):
        raise UserError(f"train.device={spec} is not a device dsnet runs on (accepted: auto, cpu, cuda, cuda:N)")
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"train.device={spec} but no CUDA device is available (use cpu or auto)")
    count = torch.cuda.device_count()
    if world_size > 1:
        if spec.startswith("cuda:"):
            raise UserError(f"train.device={spec} names one GPU, but under torchrun each process takes the GPU "
                            f"of its LOCAL_RANK; use train.device=cuda (pick GPUs with CUDA_VISIBLE_DEVICES)")
        index = local_rank
        if index >= count:
            raise UserError(f"LOCAL_RANK={local_rank} but this node shows {count} CUDA device(s); start at most "
                            f"{count} processes per node (torchrun --nproc_per_node)")
    else:
        index = int(spec[5:]) if spec.startswith("cuda:") else torch.cuda.current_device()
        if index >= count:
            raise UserError(f"train.device={spec} but this machine shows {count} CUDA device(s) "
                            f"(cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def setup_runtime(device: str, seed: int, deterministic: bool, timeout_s: float = 300.0) -> Runtime:
    """Pick the device (``resolve_device``) and, under torchrun (WORLD_SIZE > 1), join the
    process group (nccl on CUDA, gloo on CPU) with a bounded timeout so a lost rank ends the run.
    Seeds torch, numpy and ``random`` per rank (``seed + rank``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device, world, int(os.environ.get("LOCAL_RANK", "0")))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    rank = 0
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout_s))
        rank = dist.get_rank()
    _seed_all(seed + rank)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    return Runtime(dev, rank, world, deterministic)


def _seed_all(seed: int) -> None:
    """Seed the global streams of torch, ``random`` and numpy (numpy's takes 32 bits)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def close_runtime() -> None:
    """Leave the process group, if this process joined one (the end of a command under torchrun)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def autocast_factory(amp: str, device: torch.device) -> tuple[Callable[[], Any], torch.amp.GradScaler | None]:
    """A context factory for mixed precision and, for fp16, a gradient scaler.

    ``auto``: bf16 where supported (CUDA with bf16, or CPU), else fp16 on CUDA.
    """
    if amp == "auto":
        amp = "bf16" if device.type == "cpu" or torch.cuda.is_bf16_supported() else "fp16"
    if amp == "none":
        return contextlib.nullcontext, None
    if amp == "fp16" and device.type != "cuda":
        raise UserError("train.amp=fp16 needs a CUDA device; use bf16 on CPU")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


def route_generator(seed: int, step: int) -> torch.Generator:
    """The route-sampling generator of one optimizer step. Seeded from (seed, step) only, so every
    rank samples the same sandwich and a resumed run samples what the original would have."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of one rank's epoch: its loader's generator (shuffling in one process, the
    workers' seeds and so every augmentation draw) starts from it. Distinct for every (rank,
    epoch) of a run, so ranks never augment in lockstep; rank 0's is that of a one-process run."""
    return seed * 7919 + epoch + rank * 1_000_003


@contextlib.contextmanager
def cudnn_autotune(runtime: Runtime) -> Any:
    """cuDNN picks the fastest kernels for training's fixed shapes (``cudnn.benchmark``), unless
    the run is deterministic; evaluation (routed batches of every size) runs without it."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = runtime.device.type == "cuda" and not runtime.deterministic
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def prepare_run_dir(cfg: Config, resuming: bool) -> Path:
    """Create ``output.dir``; refuse to write over an existing run unless resuming or told to."""
    check_tensorboard(cfg.output.tensorboard)
    out = Path(cfg.output.dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output.dir {out} exists and is not a folder")
    last = out / "checkpoints" / "last.pth"
    if last.exists() and not resuming and not cfg.output.overwrite:
        raise UserError(f"output.dir {out} already holds a run; continue it with train.resume={last}, "
                         "or choose another output.dir (output.overwrite=true replaces it)")
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    if resuming:  # a run killed while saving leaves its half-written temporary file behind
        for stale in (out / "checkpoints").glob(".*.tmp"):
            stale.unlink(missing_ok=True)
    return out


# keys a resumed run may change at will: where it writes, what it shows, where and how it runs, where the
# data lies (its classes are checked: check_resumed_classes)
RESUME_FREE = ("output.", "train.resume", "train.resume_changes", "train.progress", "train.log_interval",
               "train.eval_interval", "train.device", "train.deterministic", "train.channels_last", "train.init_from",
               "data.num_workers", "data.val_batch_size", "data.root", "data.normalize_on", "gate.eval_interval")
# keys a stage never reads (a key ending in "." stands for its section)
UNREAD_BY_STAGE = {"supernet": ("gate.",), "static": ("gate.",),
                   "gate": ("ieb.", "train.epochs", "train.lr", "train.lr_base_batch", "train.opt",
                            "train.weight_decay", "train.warmup_epochs", "train.best_metric", "train.label_smoothing")}


def _flat(cfg: Config) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, section in config_to_dict(cfg).items() for k, v in section.items()}


def _listed(key: str, keys: Sequence[str]) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in keys)


def _changes_text(changes: Sequence[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changes)


def resume_changes(state: dict, cfg: Config, path: str | os.PathLike) -> list[tuple[str, Any, Any]]:
    """The keys of ``cfg`` that differ from the config the checkpoint ``state`` (at ``path``) was
    trained with and alter its training, as (key, old value, new value); keys in ``RESUME_FREE`` and
    those the checkpoint's stage never reads pass. Raises UserError naming them unless
    ``train.resume_changes=accept`` (``Loop.retrain_changed`` then trains on with them)."""
    old, new = _flat(config_from_dict(state["config"])), _flat(cfg)
    passing = RESUME_FREE + UNREAD_BY_STAGE.get(state.get("stage"), ())
    changes = [(key, old.get(key), value) for key, value in new.items()
               if old.get(key) != value and not _listed(key, passing)]
    if changes and cfg.train.resume_changes != "accept":
        raise UserError(f"train.resume={path} was trained with another config, and {_changes_text(changes)} would "
                         f"change its training; resume with the checkpoint's values, or add "
                         f"train.resume_changes=accept to train on with the new ones (the lr schedule is rebuilt)")
    return changes


def check_resume_target(path: str | os.PathLike, run_dir: Path) -> None:
    """Refuse to continue the checkpoint at ``path`` into ``run_dir`` (``output.dir``) when that
    folder holds another run, whose checkpoints and logs it would overwrite. (Into a folder without
    a run it branches the run.)"""
    home = Path(path).resolve().parent.parent
    if home != run_dir.resolve() and (run_dir / "checkpoints" / "last.pth").exists():
        raise UserError(f"train.resume={path} continues the run in {home}, but output.dir={run_dir} holds another "
                         f"run, whose checkpoints it would overwrite; set output.dir={home} (or a new folder to "
                         "branch the run)")


def check_resumed_classes(state: dict, classes: Sequence[str] | None, path: str | os.PathLike) -> None:
    """Refuse to resume a checkpoint trained on other classes than the data's (``classes``; None:
    not known to the stage)."""
    ours, theirs = (list(classes) if classes is not None else None), state.get("classes")
    if ours is None or theirs is None or list(theirs) == ours:
        return
    first = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
    had = f"'{theirs[first]}'" if first < len(theirs) else "no more classes"
    has = f"'{ours[first]}'" if first < len(ours) else "no more classes"
    raise UserError(f"train.resume={path} was trained on {len(theirs)} classes and the data has {len(ours)}: "
                     f"class {first} is {has} in the data but {had} in the checkpoint (check data.root)")


def record_config(cfg: Config, run_dir: Path, resumed: bool) -> Path:
    """Save the config a run starts with as ``config.yaml``. A resumed run keeps it and, when its
    config differs from the last one saved (in any key but ``train.resume``), saves it beside as
    ``config.resume-N.yaml`` (N = 1, 2, ...). Returns the file that holds ``cfg``."""
    first = run_dir / "config.yaml"
    if not resumed or not first.exists():
        save_config(cfg, first)
        return first
    later = sorted(run_dir.glob("config.resume-*.yaml"), key=lambda p: int(p.stem.rpartition("-")[2] or 0))
    last = later[-1] if later else first
    unresumed = lambda c: {k: v for k, v in _flat(c).items() if k != "train.resume"}  # noqa: E731
    if unresumed(load_config(last)) == unresumed(cfg):
        return last
    path = run_dir / f"config.resume-{len(later) + 1}.yaml"
    save_config(cfg, path)
    logger.info("resumed with another config: saved as %s (%s keeps the one the run started with)", path.name,
                first.name)
    return path


def updates_per_epoch(loader: Any, cfg: Config) -> int:
    """Optimizer updates in one epoch of ``loader`` (``train.max_steps_per_epoch``, ``train.grad_accum``)."""
    steps = len(loader)
    if cfg.train.max_steps_per_epoch is not None:
        steps = min(steps, cfg.train.max_steps_per_epoch * cfg.train.grad_accum)
    return max(1, steps // cfg.train.grad_accum)


def checkpoint_run(state: dict, overrides: Sequence[str] = (), data_root: str | None = None) -> tuple[Config, Runtime]:
    """(the config a checkpoint was trained with, ``data_root`` and then ``section.key=value``
    ``overrides`` applied; a runtime on its ``train.device``) for a command that reads the checkpoint."""
    cfg = config_from_dict(state["config"])
    if data_root is not None:
        cfg = replace(cfg, **{"data.root": data_root})
    cfg = apply_overrides(cfg, overrides)
    return cfg, setup_runtime(cfg.train.device, cfg.train.seed, False)


def load_run(path: str, overrides: Sequence[str] = (), data_root: str | None = None, use_ema: bool = False,
             stages: tuple[str, ...] = ("supernet", "gate")) -> tuple[dict, nn.Module, Config, Runtime]:
    """(checkpoint state, its model (or EMA) in eval mode on the run's device, config and runtime
    as ``checkpoint_run`` gives them)."""
    state = read_checkpoint(path, stages)
    cfg, runtime = checkpoint_run(state, overrides, data_root)
    return state, build_model(state, use_ema).to(runtime.device).eval(), cfg, runtime


@dataclass
class Evaluation:
    """What a stage's evaluation returns: the eval.json-shaped ``report``, the ``scalars`` logged
    beside it (metrics.jsonl, summary.csv) and the metric that ranks ``best.pth`` (None: the stage
    writes ``last.pth`` only, as stage two does: its top-1 rises with its MAdds)."""

    report: dict
    scalars: dict[str, float] = field(default_factory=dict)
    best_metric: float | None = None

    def record(self) -> dict:
        """The evaluation as the epoch record holds it: ``eval``, the scalars, ``best_metric``."""
        best = {} if self.best_metric is None else {"best_metric": self.best_metric}
        return {"eval": self.report, **self.scalars, **best}

    @classmethod
    def from_record(cls, record: dict) -> Evaluation | None:
        """The evaluation a checkpoint's last metrics hold (None if that epoch was not evaluated);
        its report and best metric, not its scalars."""
        if "eval" not in record:
            return None
        return cls(record["eval"], best_metric=record.get("best_metric"))


def loop_kwargs(cfg: Config) -> dict:
    """``Loop``'s settings from the config's ``train`` and ``output`` sections."""
    t = cfg.train
    return {"grad_accum": t.grad_accum, "seed": t.seed, "batch_size": t.batch_size,
            "max_steps_per_epoch": t.max_steps_per_epoch, "channels_last": t.channels_last,
            "log_interval": t.log_interval, "eval_interval": t.eval_interval, "progress": t.progress,
            "checkpoint_interval": cfg.output.checkpoint_interval, "tensorboard": cfg.output.tensorboard}


@dataclass(kw_only=True)
class Loop:
    """Runs ``epochs`` epochs of ``step`` with one optimizer update per ``grad_accum`` batches."""

    cfg: Config                           # the resolved config, saved in every checkpoint
    runtime: Runtime
    stage: str
    model: nn.Module                      # the bare model (saved, evaluated)
    train_model: nn.Module                # what the step calls: the model or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: Any
    step: Callable[..., dict]
    evaluate: Callable[[int], Evaluation]
    train_loader: Any
    epochs: int
    run_dir: Path
    ema: Any = None
    scaler: torch.amp.GradScaler | None = None
    mixup: Callable | None = None
    clip_grad: float | None = None
    train_mode: bool = True               # False: the model stays in eval mode (frozen stage two)
    total_steps: int | None = None        # stop after this many optimizer updates (mid-epoch if need be)
    extra_state: dict = field(default_factory=dict)
    # settings (loop_kwargs)
    grad_accum: int = 1
    seed: int = 0
    batch_size: int = 1                   # per process, for the images/s figure
    max_steps_per_epoch: int | None = None
    channels_last: bool = False
    log_interval: int = 50                # optimizer steps
    eval_interval: int = 1                # epochs
    checkpoint_interval: int = 1          # epochs
    progress: bool = True
    tensorboard: bool = False
    # progress
    epoch: int = 0
    global_step: int = 0
    best: float = -math.inf
    last_metrics: dict = field(default_factory=dict)  # the last epoch's record (logged, checkpointed)
    last_eval: Evaluation | None = None    # its evaluation, None if that epoch was not evaluated

    def __post_init__(self) -> None:
        self.logs = RunLog(self.run_dir, self.runtime.is_main, self.tensorboard)
        self._nonfinite: tuple[list[str], Tensor] | None = None  # (loss names, flags on the device)
        self._checked_step = self.global_step                     # losses up to here were finite

    # ---- state ------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"stage": self.stage, "model_name": self.model.model_name,
                "model_kwargs": dict(self.model.model_kwargs), "model": self.model.state_dict(),
                "ema": self.ema.module.state_dict() if self.ema is not None else None,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "epoch": self.epoch, "step": self.global_step, "best": self.best, "rng": rng_state(),
                "rank_rng": self._rank_rng(), "config": config_to_dict(self.cfg), "metrics": self.last_metrics,
                **self.extra_state}

    def _rank_rng(self) -> list[dict] | None:
        """Every rank's global RNG states, rank 0 first (a collective under DDP; None in one
        process, where ``rng`` holds them): each rank draws its own dropout masks, noise and
        augmentation, and a resumed rank must continue its own streams, not rank 0's."""
        if not self.runtime.distributed:
            return None
        mine = io.BytesIO()
        torch.save(rng_state(), mine)  # as bytes: gathering tensors inside objects is not reliable across torch versions
        states: list[Any] = [None] * self.runtime.world_size
        dist.all_gather_object(states, mine.getvalue())
        return [torch.load(io.BytesIO(state), weights_only=True) for state in states]

    def resume(self, path: str) -> dict:
        """Continue from a checkpoint of this stage: weights, EMA, optimizer, scheduler, RNG.
        Returns the checkpoint's state."""
        state = read_checkpoint(path, self.stage)
        if state["model_name"] != self.model.model_name or dict(state["model_kwargs"]) != dict(self.model.model_kwargs):
            raise UserError(f"train.resume={path} holds {state['model_name']}({state['model_kwargs']}), "
                             f"but the config builds {self.model.model_name}({self.model.model_kwargs})")
        if state.get("optimizer") is None:
            raise UserError(f"train.resume={path} holds weights but no training state (a converted "
                             f"checkpoint?); start a new run from it with train.init_from={path}")
        check_resume_target(path, self.run_dir)
        check_resumed_classes(state, self.extra_state.get("classes"), path)
        changes = resume_changes(state, self.cfg, path)
        if changes and state["epoch"] >= self.epochs:
            raise UserError(f"train.resume={path} has trained {state['epoch']} epochs and the new config asks for "
                             f"{self.epochs}, so its changes ({_changes_text(changes)}) would train nothing; "
                             f"ask for more epochs to train on")
        built = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.module.load_state_dict(state["ema"])
        if not any(key.endswith(".opt") for key, _, _ in changes):  # another optimizer starts afresh
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None and not changes:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.global_step, self.best = state["epoch"], state["step"], state.get("best", -math.inf)
        self.last_metrics = state.get("metrics") or {}
        self.last_eval = Evaluation.from_record(self.last_metrics)
        self._restore_rng(state)
        if changes:
            self.retrain_changed(changes, built, had_ema=state.get("ema") is not None)
        self._checked_step = self.global_step
        logger.info("resumed %s from %s at epoch %d (step %d)", self.stage, path, self.epoch, self.global_step)
        return state

    def retrain_changed(self, changes: list[tuple[str, Any, Any]], built: list[dict], had_ema: bool) -> None:
        """After ``resume`` with accepted config ``changes`` (``resume_changes``): train on under the
        new config. The optimizer's settings are the ones it was ``built`` with from the new config
        (learning rate scaled to the new batch, weight decay, momentum; its state, such as momentum
        buffers, is the checkpoint's); the step moves to where the epochs done end in the new
        config's epochs (another batch size or step limit makes them another number of steps); the
        schedule is the new config's (its length, warm-up and lr), taken up at that step; an EMA
        the checkpoint lacked (``had_ema``) starts from its weights."""
        for group, settings in zip(self.optimizer.param_groups, built):
            group.update(settings)
        step = self.epoch * updates_per_epoch(self.train_loader, self.cfg)
        if step != self.global_step:
            logger.info("the step moves to %d, the end of epoch %d at the new settings (%d steps were taken)",
                        step, self.epoch, self.global_step)
            self.global_step = step
        if self.scheduler is not None:
            self.scheduler.step_update(num_updates=self.global_step)
        if self.ema is not None and not had_ema:
            self.ema.set(self.model)
        logger.info("train.resume_changes=accept: training on with %s; the lr schedule is rebuilt for them "
                    "(lr now %.4g)", _changes_text(changes), self.optimizer.param_groups[0]["lr"])

    def _restore_rng(self, state: dict) -> None:
        """This rank's RNG streams from a checkpoint: its own when the checkpoint holds every
        rank's (saved by as many processes as now run), else rank 0's on rank 0 and, on the other
        ranks, fresh streams from (seed, rank, epoch) (the run goes on, but not bit for bit)."""
        saved = state.get("rank_rng")
        if saved is not None and len(saved) == self.runtime.world_size:
            set_rng_state(saved[self.runtime.rank])
        elif self.runtime.rank == 0:
            set_rng_state(state["rng"])
        else:
            _seed_all(epoch_seed(self.seed, self.runtime.rank, self.epoch))
            if self.runtime.rank == 1:
                logger.warning("the checkpoint was saved by %d process(es), this run has %d: ranks 1.. start fresh "
                               "random streams, so the run continues but not bit for bit",
                               len(saved) if saved is not None else 1, self.runtime.world_size)

    def save(self, best: bool) -> None:
        """Write ``last.pth`` (and ``best.pth`` when ``best``) on the main rank. Under DDP every
        rank calls it (it gathers every rank's RNG state); stops first if a loss went non-finite
        since the last check, so no checkpoint holds weights trained on one."""
        self.check_finite()
        state = self.state()
        if not self.runtime.is_main:
            return
        ckpt = self.run_dir / "checkpoints"
        save_checkpoint(state, ckpt / "last.pth")
        if best:
            save_checkpoint(state, ckpt / "best.pth")

    def take_evaluation(self, result: Evaluation, **marks: Any) -> None:
        """Make ``result`` (an evaluation after training: recalibrated BN, a deployment policy) the
        run's last, with ``marks`` added to its record; the next ``save`` checkpoints it."""
        self.last_eval = result
        self.last_metrics = {**self.last_metrics, **result.record(), **marks}

    def log(self, record: dict) -> None:
        """One ``metrics.jsonl`` record (and TensorBoard scalars) from the main process."""
        self.logs.record(record)

    def sync_buffers(self) -> None:
        """Under DDP, give every rank rank 0's buffers, the EMA's too (BN statistics drift apart:
        each rank's last forward saw its own batch), so each rank evaluates its shard with the
        very model rank 0 saves."""
        if self.runtime.distributed:
            for net in [self.model] + ([self.ema.module] if self.ema is not None else []):
                for buf in net.buffers():
                    dist.broadcast(buf, 0)

    # ---- loop -------------------------------------------------------------------------------
    def backward(self, loss: Tensor) -> None:
        scaled = loss / self.grad_accum
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()

    def _optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.clip_grad:
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                           self.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)
        if self.scheduler is not None:
            self.scheduler.step_update(num_updates=self.global_step)

    def _note_finite(self, losses: dict[str, Tensor]) -> None:
        """Fold this step's losses into the non-finite flags, on the device: no host sync here."""
        bad = ~torch.isfinite(torch.stack([v.detach().float().reshape(()) for v in losses.values()]))
        if self._nonfinite is None or self._nonfinite[0] != list(losses):
            self._nonfinite = (list(losses), torch.zeros_like(bad))
        self._nonfinite[1].logical_or_(bad)

    def check_finite(self) -> None:
        """Stop if any loss went non-finite since the last check (read at the log interval and
        before every save: one host sync there, none per step); every rank stops together. The
        error names the steps in between and the subnets; the last checkpoint predates them."""
        names, flags = self._nonfinite if self._nonfinite is not None else ([], None)
        first = self._checked_step + 1
        self._checked_step = self.global_step
        if flags is None:
            return
        if self.runtime.distributed:
            flags = flags.to(torch.int32)
            dist.all_reduce(flags)  # a NaN on one rank stops them all
        bad = [name for name, flag in zip(names, flags.tolist()) if flag]
        self._nonfinite = None
        if bad:
            last = max(first, self.global_step)
            steps = f"step {first}" if last == first else f"steps {first}-{last}"
            raise TrainingError(f"non-finite loss in epoch {self.epoch + 1}, {steps}, subnet(s) "
                                f"{', '.join(repr(n) for n in bad)}; stopped, the last good checkpoint is "
                                f"{self.run_dir / 'checkpoints' / 'last.pth'}")

    def train_epoch(self, progress: bool) -> dict:
        self.train_model.train(self.train_mode)
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        generator = getattr(self.train_loader, "generator", None)
        if generator is not None:  # the loader's own generator: order and worker seeds per rank and epoch
            generator.manual_seed(epoch_seed(self.seed, self.runtime.rank, self.epoch))
        limit = self.max_steps_per_epoch
        total = len(self.train_loader) if limit is None else min(limit * self.grad_accum, len(self.train_loader))
        if self.total_steps is not None:  # the last epoch of a step budget stops early
            total = min(total, (self.total_steps - self.global_step) * self.grad_accum)
        bar = progress_bar(total, f"{self.stage} epoch {self.epoch + 1}/{self.epochs}", progress and self.runtime.is_main)
        sums: dict[str, Tensor] = {}
        start = time.perf_counter()
        with cudnn_autotune(self.runtime):
            count = self._train_batches(bar, total, sums)
        bar.close()
        self.check_finite()  # before this epoch's evaluation and checkpoint
        elapsed = time.perf_counter() - start
        return {f"train_loss_{k}": float(v) / max(count, 1) for k, v in sums.items()} | {
            "train_time_s": round(elapsed, 2), "images_per_s": round(count * self.batch_size / max(elapsed, 1e-9), 1),
            "lr": self.optimizer.param_groups[0]["lr"]}

    def _train_batches(self, bar: Any, total: int, sums: dict[str, Tensor]) -> int:
        """One epoch's first ``total`` batches: steps, optimizer updates, log records; the losses
        summed into ``sums``. Returns the number of batches."""
        count = 0
        for i, (x, y) in enumerate(self.train_loader):
            if i >= total:
                break
            x, y = x.to(self.runtime.device, non_blocking=True), y.to(self.runtime.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if self.mixup is not None:
                x, y = self.mixup(x, y)
            out = self.step(x, y, route_generator(self.seed, self.global_step), self.backward)
            self._note_finite(out["losses"])
            for name, value in out["losses"].items():
                sums[name] = sums.get(name, 0) + value.detach()
            if (i + 1) % self.grad_accum == 0:
                self._optimizer_step()
                if self.global_step % self.log_interval == 0:
                    self.check_finite()
                    lr = self.optimizer.param_groups[0]["lr"]
                    losses = {k: round(float(v), 5) for k, v in out["losses"].items()}  # sync at log interval
                    self.log({"stage": self.stage, "epoch": self.epoch + 1, "step": self.global_step,
                              "lr": lr, "loss": sum(losses.values()), "losses": losses})
                    bar.set_postfix(loss=f"{sum(losses.values()):.3f}", lr=f"{lr:.2e}")
            bar.update(1)
            count += 1
        return count

    def run(self) -> dict:
        """Train from ``self.epoch`` to ``self.epochs`` (or ``total_steps``); returns the last
        epoch's metrics."""
        progress = self.progress
        while self.epoch < self.epochs:
            train_metrics = self.train_epoch(progress)
            if self.scheduler is not None:
                self.scheduler.step(self.epoch + 1)
            self.epoch += 1
            metrics: dict = {"stage": self.stage, "epoch": self.epoch, **train_metrics}
            self.last_eval = None
            if self.epoch % self.eval_interval == 0 or self.epoch == self.epochs:
                self.sync_buffers()
                self.last_eval = self.evaluate(self.epoch)
                metrics.update(self.last_eval.record())
            metric = self.last_eval.best_metric if self.last_eval is not None else None
            self.last_metrics = metrics
            improved = metric is not None and metric >= self.best
            if improved:
                self.best = metric
            if improved or self.epoch % self.checkpoint_interval == 0 or self.epoch == self.epochs:
                self.save(improved)
            self.logs.epoch(metrics)
            if self.runtime.is_main:
                logger.info("%s epoch %d/%d: %s", self.stage, self.epoch, self.epochs,
                            ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in metrics.items() if k not in ("stage", "eval")))
        return self.last_metrics
