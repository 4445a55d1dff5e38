"""``dsnet export``: a static subnet, the gated model or a baseline's plain model as a file that
runs without dsnet.

What ``dsnet export`` writes:

- ``--subnet I --format torchscript``: one TorchScript file.
- ``--dynamic --format torchscript``: one TorchScript file whose ``forward`` routes each sample
  (gate -> argmax -> group by route -> dense route -> input order), as ``model(x, subnet="dynamic")``;
  ``routed(x)`` also returns each sample's route index and the gate's logits.
- ``--format onnx``: one graph for ``--subnet I``, a folder of graphs for ``--dynamic``
  (``dsnet.deploy.onnx_export`` says which, and through which exporter).
- ``--format safetensors``: weights only (``dsnet.deploy.safetensors_export``).
- a static baseline checkpoint (``dsnet train-baseline``: a static subnet, an architecture, SSS's
  scaled largest route), without ``--subnet`` or ``--dynamic``: its plain model, in any format.

Every file is written beside its destination, run once on a random batch (a weights file: loaded
back into the module) and compared with dsnet's outputs before it takes its name.

The modules come from ``dsnet.deploy.extract``; the writers are ``dsnet.deploy.torchscript``,
``dsnet.deploy.onnx_export`` and ``dsnet.deploy.safetensors_export`` (their packages are imported
only when a file of that format is written).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from dsnet.deploy.extract import extract_dynamic, extract_subnet
from dsnet.deploy.onnx_export import require_onnx, run_onnx, write_onnx
from dsnet.deploy.safetensors_export import require_safetensors, run_safetensors, save_safetensors, weights_meta
from dsnet.deploy.torchscript import quiet_deprecations, save_torchscript
from dsnet.config import check_root_used
from dsnet.errors import UserError
from dsnet.models.madds import parse_madds
from dsnet.models.net import DSNet
from dsnet.models.policy import Policy, with_policy
from dsnet.models.spec import create
from dsnet.prune.sss import scale_keys
from dsnet.prune.static import load_static
from dsnet.train.checkpoint import build_model, input_size_of, read_checkpoint
from dsnet.train.engine import autocast_factory, load_run
from dsnet.train.policy_select import target_policy
from dsnet.train.runs import build_val_loader

__all__ = ["export_command", "target_export_policy", "FORMATS"]

logger = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx", "safetensors")
# file extensions that name one format: -o with another format's extension is refused
EXTENSIONS = {".onnx": "onnx", ".safetensors": "safetensors", ".pt": "torchscript", ".ts": "torchscript"}


# ---- the gated model as plain torch.nn ------------------------------------------------------



# ---- TorchScript --------------------------------------------------------------------------------



# ---- dsnet export ----------------------------------------------------------------------------

@dataclass
class _Export:
    """What ``dsnet export`` writes: ``module`` (eval mode), an ``example`` input [B, C, H, W], the
    outputs [B, K] dsnet computes on it (the written file must give them), the weights file's
    metadata, and the module's name in the summary line. A weights file holds ``tensors`` (the
    module's state dict unless given) and is checked by loading it into ``fresh`` (a module built
    without them) along ``routes`` (``subnet=`` values; None: the module's plain call), whose
    outputs ``expected`` holds in that order."""

    module: nn.Module
    example: Tensor
    expected: Tensor
    meta: dict[str, str]
    what: str
    tensors: dict[str, Tensor] | None = None
    fresh: nn.Module | None = None
    routes: tuple = (None,)


def export_command(checkpoint: str, subnet: int | None, dynamic: bool, fmt: str, output: str,
                   input_size: tuple[int, int, int] | None = None, policy: Any = None,
                   onnx_exporter: str = "dynamo") -> str:
    """``dsnet export``: write static subnet ``subnet`` or the gated model (``dynamic``) of a
    supernet checkpoint, or the plain model of a static baseline checkpoint (neither given), as
    ``fmt``; check the file against dsnet on a random batch, return a summary line.

    ``input_size`` (C, H, W) sets the example input (default: the run's ``data.input_size``, else
    the model's); ONNX graphs keep its H and W, TorchScript takes any size. ``policy``
    (``dsnet.models.policy.Policy``) replaces the checkpoint's deployment policy; ``onnx_exporter`` picks
    ``save_onnx``'s exporter. Raises UserError naming the bad value (format, exporter, subnet,
    route options that do not fit the checkpoint, existing output, missing packages).
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    state = read_checkpoint(checkpoint, ("supernet", "gate", "static"))
    static = state["stage"] == "static"
    if static and (subnet is not None or dynamic or policy is not None):
        raise UserError(f"{checkpoint} is a static baseline checkpoint holding one plain model; export it "
                        "without --subnet, --dynamic or --target-madds")
    if not static and dynamic == (subnet is not None):
        raise UserError("give exactly one of --subnet I (a static subnet) or --dynamic (the gated model)")
    out = Path(output)
    if EXTENSIONS.get(out.suffix.lower(), fmt) != fmt:
        raise UserError(f"-o {out} names a {EXTENSIONS[out.suffix.lower()]} file but --format is {fmt}; "
                        f"give -o {out.with_suffix(next(e for e, f in EXTENSIONS.items() if f == fmt))} or "
                        f"--format {EXTENSIONS[out.suffix.lower()]}")
    if out.exists() or out.is_symlink():
        raise UserError(f"{out} exists; dsnet export never overwrites, choose another -o")
    if fmt == "onnx" and dynamic and out.suffix == ".onnx":
        raise UserError(f"--dynamic --format onnx writes a folder (gate.onnx, route_R.onnx, dynamic.json); "
                         f"give -o a folder name such as {out.with_suffix('')}, not {out}")
    if fmt == "onnx":
        require_onnx(onnx_exporter)
    if fmt == "safetensors":
        require_safetensors()
    job = _static_export(state, input_size) if static else \
        _supernet_export(checkpoint, state, subnet, dynamic, fmt, input_size, policy)
    with _fresh_output(out) as tmp:
        check = _verify(fmt, _write(job, fmt, tmp, onnx_exporter), job.example, job.expected) + _checked(job)
    how = f"onnx ({onnx_exporter} exporter)" if fmt == "onnx" else fmt
    return f"exported {job.what} of {checkpoint} as {how} -> {out} ({check})"



def target_export_policy(checkpoint: str, target_madds: str, deploy: str = "gate",
                         data_root: str | None = None) -> tuple[Policy, str]:
    """``dsnet export --dynamic --target-madds``: the ``deploy`` policy (gate cost bias or
    confidence cascade) of a stage-two ``checkpoint`` whose mean MAdds on its run's validation
    data (``data_root``: another root) is ``target_madds`` (``12M``), with the reason it was chosen."""
    target = parse_madds(target_madds)
    _, model, cfg, runtime = load_run(checkpoint, data_root=data_root, stages=("gate",))
    check_root_used(cfg, data_root)
    loader, _ = build_val_loader(cfg, runtime)
    record = target_policy(model, loader, cfg, runtime, (model.in_chans, cfg.data.input_size, cfg.data.input_size),
                           autocast_factory(cfg.train.amp, runtime.device)[0], target, deploy)
    return Policy.from_dict(record["policy"]), record["reason"]


def _example(model: DSNet, state: dict, input_size: Sequence[int] | None, n: int = 2) -> Tensor:
    """n random images [n, C, H, W]; the dynamic model's check takes 16, so that its routes differ."""
    return torch.randn(n, *input_size_of(model, state, input_size), generator=torch.Generator().manual_seed(0))


def _supernet_export(checkpoint: str, state: dict, subnet: int | None, dynamic: bool, fmt: str,
                     input_size: Sequence[int] | None, policy: Any) -> _Export:
    """Static subnet ``subnet`` or the gated model of a supernet checkpoint; as safetensors,
    ``dynamic`` means the whole supernet's weights (checked along its largest route)."""
    model = build_model(state).eval()
    if policy is not None:
        model.set_policy(policy)
    if subnet is not None and not 0 <= subnet < model.num_subnets:
        raise UserError(f"--subnet {subnet} is out of range: {state['model_name']} has {model.num_subnets} "
                         f"static subnets (0..{model.num_subnets - 1})")
    weights = dynamic and fmt == "safetensors"
    if dynamic and not weights and state.get("stage") != "gate":
        logger.warning("%s is a stage-one checkpoint: its gate's width head is untrained (stage two trains "
                       "it), so the exported dynamic model may send every sample along one route; export "
                       "a train_gate.py checkpoint to ship a trained gate", checkpoint)
    example = _example(model, state, input_size, 16 if dynamic else 2)
    meta = weights_meta(state, "supernet" if subnet is None else str(subnet))
    if weights:  # the supernet and its policy, checked on a model built by timm as a user would
        meta["policy"] = json.dumps(model.policy.to_dict())
        with torch.no_grad():
            expected = torch.cat([model(example), model(example, subnet="dynamic")])
        what = f"supernet weights and policy ({model.policy.describe(model.routing_space)})"
        return _Export(model, example, expected, meta, what, with_policy(model.state_dict(), model.policy.to_dict()),
                       create(state["model_name"], dict(state.get("model_kwargs") or {}), "the checkpoint"),
                       (None, "dynamic"))
    if dynamic:
        module, route = extract_dynamic(model), "dynamic"
        what = (f"dynamic model (routes = subnets {', '.join(map(str, model.routing_space))}; "
                f"{model.policy.describe(model.routing_space)})")
    else:
        module, route, what = extract_subnet(model, subnet).eval(), subnet, f"subnet {subnet}"
    with torch.no_grad():
        expected = model(example, subnet=route)
    return _Export(module, example, expected, meta, what)


def _static_export(state: dict, input_size: Sequence[int] | None) -> _Export:
    """The plain model of a static baseline checkpoint (``dsnet.prune.static.load_static``)."""
    model, supernet = load_static(state)
    example = _example(supernet, state, input_size)
    with torch.no_grad():
        expected = model(example)
    kind = {"arch": "an architecture", "largest": "the largest route"}.get(state["subnet"], f"subnet {state['subnet']}")
    scaled = " with SSS branch factors" if scale_keys(state["model"]) else ""
    return _Export(model, example, expected, weights_meta(state, str(state["subnet"])),
                   f"the baseline model ({kind} of {supernet.model_name}{scaled})")


def _write(job: _Export, fmt: str, path: Path, onnx_exporter: str) -> np.ndarray | None:
    """Write ``job.module`` as ``fmt`` to ``path`` and return what the written file computes on
    ``job.example`` (None: no runtime to run it)."""
    if fmt == "torchscript":
        save_torchscript(job.module, path)
        with torch.no_grad(), quiet_deprecations():
            return torch.jit.load(str(path))(job.example).numpy()
    if fmt == "onnx":
        write_onnx(job.module, job.example, path, onnx_exporter)
        return run_onnx(path, job.example.numpy())
    save_safetensors(job.module.state_dict() if job.tensors is None else job.tensors, path, job.meta)
    return run_safetensors(job.module if job.fresh is None else job.fresh, path, job.example, job.routes).numpy()


@contextmanager
def _fresh_output(out: Path) -> Iterator[Path]:
    """A temporary path beside ``out``, renamed to ``out`` on success and removed on failure,
    so a failed export leaves nothing behind."""
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield scratch / out.name
        os.replace(scratch / out.name, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _verify(fmt: str, got: np.ndarray | None, example: Tensor, expected: Tensor) -> str:
    """The written file's logits ``got`` (None: no runtime to run it) against dsnet's ``expected``
    [B, K] on ``example``: the largest |difference|, as text; a ValueError past the tolerance."""
    if got is None:
        return "not checked: onnxruntime is not installed"
    diff = float(np.abs(got - expected.numpy()).max())
    if not diff <= 1e-3 * max(1.0, float(expected.abs().max())):
        raise ValueError(f"the exported {fmt} file gives outputs {diff:.3g} away from dsnet's; "
                         "this is a dsnet bug, please report it")
    return f"max |diff| vs dsnet {diff:.1e} on a {'x'.join(map(str, example.shape))} input"


def _checked(job: _Export) -> str:
    """What the check ran, for the summary line: the routes of a weights file."""
    return " (largest route and dynamic model)" if "dynamic" in job.routes else ""
