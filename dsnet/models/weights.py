"""Weights files timm's ``pretrained=True`` loads into a dsnet supernet.

``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))`` (after
``import dsnet``) reads PATH here:

- a dsnet checkpoint (``checkpoints/last.pth``): its ``model`` weights, not the EMA copy (what
  ``dsnet evaluate`` measures without ``--ema``), and a stage-two run's shipped policy;
- ``dsnet export --dynamic --format safetensors``: the supernet's weights and the policy they
  were exported with (``dsnet.models.policy.POLICY_KEY``).

The file's model constructor arguments become the defaults of the model's; the model is built
from them and loads the weights strictly, so the result routes as ``dsnet.load_checkpoint`` does.
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dsnet.models.policy import with_policy

__all__ = ["Weights", "read_weights", "is_torchscript"]


@dataclass
class Weights:
    """What a weights file holds: the model's name, its constructor arguments and the state dict
    (with the deployment policy under ``POLICY_KEY``)."""

    model_name: str
    model_kwargs: dict[str, Any]
    state: dict[str, Tensor]


def read_weights(path: str | os.PathLike) -> Weights:
    """The supernet weights of a dsnet checkpoint or of a dynamic safetensors export at ``path``;
    ValueError, naming the file, when it holds anything else."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"pretrained file {path} does not exist")
    if path.suffix == ".safetensors":
        return _safetensors(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (pickle, zip, EOF: any unreadable file is one answer)
        kind = "a TorchScript file" if is_torchscript(path) else "not a readable weights_only checkpoint"
        raise ValueError(f"pretrained file {path} is {kind} ({type(err).__name__}); give a dsnet checkpoint "
                         "or a `dsnet export --dynamic --format safetensors` file") from None
    if not isinstance(state, dict) or "model" not in state or "model_name" not in state:
        raise ValueError(f"pretrained file {path} is not a dsnet checkpoint (no 'model' and 'model_name')")
    if state.get("stage") == "static":
        raise ValueError(f"pretrained file {path} is a static baseline checkpoint (a plain model, not a "
                         "supernet); rebuild it with dsnet.prune.static.load_static")
    policy = (state.get("deploy") or {}).get("policy")
    return Weights(state["model_name"], dict(state.get("model_kwargs") or {}), with_policy(state["model"], policy))


def _safetensors(path: Path) -> Weights:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != "dsnet-weights" or meta.get("subnet") != "supernet":
        what = f"subnet {meta['subnet']}'s extracted weights" if meta.get("subnet") else "no dsnet supernet"
        raise ValueError(f"pretrained file {path} holds {what}; export the supernet with "
                         "`dsnet export CKPT --dynamic --format safetensors`")
    return Weights(meta["model_name"], json.loads(meta.get("model_kwargs") or "{}"), tensors)


def is_torchscript(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a TorchScript archive (``torch.jit.save``: a zip with ``code/`` and
    ``constants.pkl``, which ``torch.save`` never writes)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False
