"""Checkpoints: atomic writes, safe loads, and rebuilding a supernet from a run.

A checkpoint is a plain dict loadable with ``torch.load(path, weights_only=True)`` (no pickled
code runs on load). It is written to a temporary file in the same folder, flushed and fsynced,
then renamed over the old one, so a crash or a full disk leaves the previous checkpoint whole.
"""
from __future__ import annotations

import os
import pickle
import random
import secrets
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dsnet.errors import UserError
from dsnet.models.net import DSNet
from dsnet.models.policy import Policy, with_policy
from dsnet.models.spec import create
from dsnet.models.weights import is_torchscript

__all__ = ["FORMAT", "VERSION", "CheckpointError", "save_checkpoint", "read_checkpoint", "load_checkpoint",
           "build_model", "same_supernet", "init_from_checkpoint", "rng_state", "set_rng_state", "input_size_of"]

FORMAT, VERSION = "dsnet-checkpoint", 1
STAGES = ("supernet", "gate", "static")


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable, unsafe, or not what the caller needs."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` (plus format/version) to ``path`` atomically; returns the path.

    On failure (e.g. disk full) the temporary file is removed, any previous checkpoint at
    ``path`` is untouched, and an OSError says so.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **_timm_view(state)}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with _suppress():
            os.unlink(tmp)
        if isinstance(err, OSError):
            kept = "the previous checkpoint is kept" if path.exists() else "no checkpoint was written"
            raise OSError(err.errno, f"could not write checkpoint {path} ({err.strerror or err}); {kept}") from err
        raise
    _fsync_dir(path.parent)
    return path


def _temporary(path: Path) -> tuple[int, str]:
    """A new file ``.<name>.<random>.tmp`` beside ``path``, open for writing, created with the
    permissions of any new file (0666 less the umask: group-readable as a rule; tempfile's are 0600)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), str(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def _timm_view(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with what dsnet evaluates also under 'state_dict', the first key
    ``timm.models.load_checkpoint(m, path)`` and ``timm.create_model(..., checkpoint_path=path)``
    read: the ``model`` weights (not the EMA copy, which dsnet evaluates only with ``--ema``) and,
    for a supernet, the policy a stage-two run ships (``with_policy``; ``DSNet.load_state_dict``
    applies it). No 'model_ema' key: timm's loader would prefer it by default (``use_ema=True``).
    torch.save writes a tensor held twice once, so the file does not grow."""
    state = {k: v for k, v in state.items() if k not in ("model_ema", "state_dict")}
    if state.get("stage") not in ("supernet", "gate") or not isinstance(state.get("model"), dict):
        return state
    return {**state, "state_dict": with_policy(state["model"], (state.get("deploy") or {}).get("policy"))}


def _fsync_dir(folder: Path) -> None:
    with _suppress():
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return exc[0] is not None and issubclass(exc[0], OSError)


def read_checkpoint(path: str | os.PathLike, stage: str | tuple[str, ...] | None = None) -> dict[str, Any]:
    """Load a dsnet checkpoint safely (``weights_only=True``) and check its format and stage."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist" if not path.exists()
                              else f"checkpoint {path} is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"checkpoint {path} holds objects other than tensors and plain data and "
                              f"was refused (only weights_only checkpoints load): {str(err).splitlines()[0]}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        if is_torchscript(path):
            raise CheckpointError(f"{path} is a TorchScript file (dsnet export writes them to run without dsnet); "
                                  "give the checkpoint it was exported from, RUN/checkpoints/last.pth, or run "
                                  "it with torch.jit.load") from None
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt and cannot be read "
                              f"({type(err).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dsnet checkpoint (no '{FORMAT}' format tag)")
    if state.get("version", 0) > VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {state['version']}; this dsnet "
                              f"reads versions up to {VERSION}")
    wanted = (stage,) if isinstance(stage, str) else stage
    if wanted and state.get("stage") not in wanted:
        raise CheckpointError(f"checkpoint {path} is from stage '{state.get('stage')}', "
                              f"expected {' or '.join(repr(s) for s in wanted)}")
    return state


def build_model(state: dict[str, Any], use_ema: bool = False) -> torch.nn.Module:
    """Rebuild the model a checkpoint describes and load its (or its EMA's) weights."""
    name, kwargs = state.get("model_name"), dict(state.get("model_kwargs") or {})
    model = create(name, kwargs, "the checkpoint", CheckpointError)
    weights = state.get("ema") if use_ema and state.get("ema") is not None else state["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint weights do not fit {name}({kwargs}): "
                              f"{str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err}") from None
    if (state.get("deploy") or {}).get("policy"):  # the policy stage two chose (dsnet.train.policy_select)
        model.set_policy(Policy.from_dict(state["deploy"]["policy"]))
    return model


def load_checkpoint(path: str | os.PathLike, use_ema: bool = False) -> torch.nn.Module:
    """The supernet of a run (with its trained gates if stage two ran), in eval mode, on CPU."""
    return build_model(read_checkpoint(path, ("supernet", "gate")), use_ema).eval()


def rng_state() -> dict[str, Any]:
    """Global RNG states (torch, CUDA, numpy, random) as weights_only-loadable data."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()),
                                                       *np_state[2:]],
             "random": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    version, internal, gauss = state["random"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def same_supernet(model: DSNet, state: dict[str, Any]) -> bool:
    """Whether a checkpoint ``state`` holds the supernet ``model`` is, up to what a new run may
    change about it (its classes, routing space and dropout)."""
    plain = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    ours, theirs = dict(model.model_kwargs), dict(state.get("model_kwargs") or {})
    shared = ours.keys() & theirs.keys() - {"num_classes", "routing_space", "drop_rate"}
    return state.get("model_name") == model.model_name and all(plain(ours[k]) == plain(theirs[k]) for k in shared)


def init_from_checkpoint(model: torch.nn.Module, path: str | os.PathLike) -> list[str]:
    """Load the weights of a supernet checkpoint (a run's or ``dsnet convert``'s) into ``model``
    to start a new run from them; optimizer and schedule are the new run's. A classifier for
    another number of classes is left as ``model`` built it. Returns the keys left as built."""
    state = read_checkpoint(path, ("supernet", "gate"))
    if not same_supernet(model, state):
        raise CheckpointError(f"train.init_from={path} holds {state.get('model_name')}({state.get('model_kwargs')}), "
                              f"but the config builds {model.model_name}({dict(model.model_kwargs)})")
    own = model.state_dict()
    weights = {k: v for k, v in state["model"].items() if k in own and own[k].shape == v.shape}
    kept = [k for k in own if k not in weights]
    misfit = [k for k in kept if not (k.startswith("classifier.") or ".width_head." in k)]
    if misfit:
        raise CheckpointError(f"train.init_from={path}: '{misfit[0]}' does not fit {model.model_name}")
    model.load_state_dict({**own, **weights})
    return kept


def input_size_of(model: DSNet, state: dict, input_size: Sequence[int] | None) -> tuple[int, int, int]:
    """The (C, H, W) a command runs ``model`` (a supernet) at: ``input_size`` (``--input-size``,
    checked), else the checkpoint ``state``'s ``data.input_size``, else the model's default."""
    if input_size is None:
        side = ((state.get("config") or {}).get("data") or {}).get("input_size")
        return (model.in_chans, side, side) if isinstance(side, int) else tuple(model.default_input_size)
    size = tuple(int(s) for s in input_size)
    if len(size) != 3 or size[0] != model.in_chans or min(size) < 1:
        raise UserError(f"--input-size must be C H W with C = {model.in_chans} and H, W >= 1, got {list(size)}")
    return size
