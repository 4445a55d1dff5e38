"""``dsnet export --format safetensors``: a model's weights as safetensors.

- ``--subnet I``: the extracted static subnet's state dict (``dsnet.extract_subnet``; plain
  torch.nn names), loadable into that extracted module;
- ``--dynamic``: the whole supernet's state dict (the gated model runs on all of it) and its
  deployment policy (``dsnet.models.policy.POLICY_KEY``), loadable into
  ``timm.create_model(model_name, **model_kwargs)`` after ``import dsnet`` (``load_state_dict``
  applies the policy, so ``subnet="dynamic"`` routes as the checkpoint did), or in one call by
  ``timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))``;
- a static baseline checkpoint: its plain model's state dict, loadable into the model
  ``dsnet.prune.static.load_static`` rebuilds (``subnet`` "arch": ``dsnet.prune.arch.build_plain`` of the
  ``architecture`` record; keys ending ``.scale``: SSS's branch factors, ``dsnet.prune.sss.add_scales``).

The file's metadata (strings, as safetensors stores them) names the model, its constructor
arguments, the route, the policy (JSON, for the reader; the tensor is what loads) and, for an
architecture, its record, so the weights can be matched to their architecture without dsnet's
checkpoint.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any

import torch
from torch import Tensor, nn

from dsnet.errors import UserError

__all__ = ["require_safetensors", "weights_meta", "save_safetensors", "run_safetensors"]


def require_safetensors() -> None:
    """Refuse ``--format safetensors`` before any work when the package is missing."""
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        raise UserError("--format safetensors needs the safetensors package: pip install safetensors") from None


def weights_meta(state: dict[str, Any], subnet: str) -> dict[str, str]:
    """The metadata of a weights file cut from checkpoint ``state``: format, model, stage,
    constructor kwargs (JSON), ``subnet`` and, for an architecture, its record (JSON)."""
    meta = {"format": "dsnet-weights", "model_name": str(state["model_name"]), "stage": str(state.get("stage")),
            "model_kwargs": json.dumps(dict(state.get("model_kwargs") or {}), default=list), "subnet": subnet}
    if state.get("architecture") is not None:
        meta["architecture"] = json.dumps(state["architecture"])
    return meta


def save_safetensors(tensors: dict[str, Tensor], path: str | os.PathLike, meta: dict[str, str]) -> int:
    """Write ``tensors`` (a state dict) with ``meta`` to ``path``; returns the number of tensors."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return len(tensors)


@torch.no_grad()
def run_safetensors(fresh: nn.Module, path: str | os.PathLike, x: Tensor, routes: tuple = (None,)) -> Tensor:
    """x: [B, C, H, W] -> the outputs of ``fresh`` (a module built without these weights) with
    every weight, and a supernet's policy, read back from ``path`` (strictly: no key missing or
    left over), along each of ``routes`` (``subnet=`` values; None: the module's plain call),
    concatenated on the batch axis."""
    from safetensors.torch import load_file

    fresh = copy.deepcopy(fresh).eval()
    fresh.load_state_dict(load_file(str(path)))
    return torch.cat([fresh(x) if r is None else fresh(x, subnet=r) for r in routes])
