"""Subnet extraction and deployment: a route or the gated model as plain torch.nn, TorchScript, ONNX.

``extract_subnet(model, i)`` is static subnet ``i`` as a plain model; ``extract_dynamic(model)`` is
the gated model as one: ``pre`` (the units before the gate, at the routing space's shared base
route), ``gate`` (attention and width head) and one dense ``posts[r]`` per route of the routing
space. Both hold torch.nn layers (and the dense twins of ``dsnet.models.blocks``) only, and both
script with ``torch.jit.script``; the saved files load with ``torch.jit.load`` where dsnet is not
installed.

What ``dsnet export`` writes:

- ``--subnet I --format torchscript``: one TorchScript file.
- ``--dynamic --format torchscript``: one TorchScript file whose ``forward`` routes each sample
  (gate -> argmax -> group by route -> dense route -> input order), as ``model(x, subnet="dynamic")``;
  ``routed(x)`` also returns each sample's route index and the gate's logits.
- ``--format onnx``: one graph for ``--subnet I``, a folder of graphs for ``--dynamic``
  (``dsnet.onnx_export`` says which, and through which exporter).
- ``--format safetensors``: weights only (``dsnet.safetensors_export``).
- a static baseline checkpoint (``dsnet train-baseline``: a static subnet, an architecture, SSS's
  scaled largest route), without ``--subnet`` or ``--dynamic``: its plain model, in any format.

Every file is written beside its destination, run once on a random batch (a weights file: loaded
back into the module) and compared with dsnet's outputs before it takes its name.

TorchScript (``torch.jit.script`` / ``save`` / ``load``) is deprecated upstream and still works in
torch 2.14; dsnet silences the deprecation warnings around its own calls, since a user who asked
for the format can do nothing about them.
"""
from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from dsnet.errors import UserError
from dsnet.heads import head_output
from dsnet.layers import DenseGate
from dsnet.models.net import DenseNet, DSNet
from dsnet.policy import confidence
from dsnet.routes import fixed_route as _route

__all__ = ["extract_subnet", "extract_dynamic", "DynamicNet", "save_torchscript", "quiet_deprecations",
           "export_command", "input_size_of", "FORMATS"]

logger = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx", "safetensors")


def extract_subnet(model: DSNet, subnet: int | str | Sequence[int] | None = None) -> nn.Module:
    """A dense copy of ``subnet`` (index, "largest" or route) built from torch.nn layers only.

    It holds the sliced weights and that width's BN statistics, so in eval mode it returns what
    ``model(x, subnet=subnet)`` returns. The copy shares no storage with the supernet.
    """
    return model.extract(_route(model, subnet))


# ---- the gated model as plain torch.nn ------------------------------------------------------

class DynamicNet(nn.Module):
    """The gated model as a plain, scriptable module (inference only; built by ``extract_dynamic``).

    ``forward(x)``: ``pre`` -> ``gate`` -> argmax -> samples grouped by route -> ``posts[r]`` per
    non-empty group -> logits in input order. ``subnets[r]`` is route r's static subnet index.
    """

    def __init__(self, pre: nn.Sequential, gate: DenseGate, posts: Sequence[DenseNet],
                 subnets: Sequence[int], num_classes: int, cascade_threshold: float = -1.0,
                 cascade_margin: bool = True) -> None:
        super().__init__()
        self.pre, self.gate, self.posts = pre, gate, nn.ModuleList(posts)
        self.subnets: List[int] = [int(i) for i in subnets]
        self.num_classes = int(num_classes)
        self.cascade_threshold = float(cascade_threshold)  # >= 0: the confidence cascade, not the gate
        self.cascade_margin = bool(cascade_margin)  # the cascade's confidence: top-two margin, else top probability

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C, H, W] -> logits [B, num_classes], each sample along the route its gate picks."""
        return self.routed(x)[0]

    @torch.jit.export
    def routed(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """x: [B, C, H, W] -> (logits [B, K], route index [B] (long), gate logits [B, R]).

        One host sync per call: the group sizes decide which routes run.
        """
        h, gate_logits = self.gate.forward_gate(self.pre(x))
        if self.cascade_threshold >= 0.0:
            return self.cascade(h, gate_logits)
        choice = gate_logits.argmax(1)
        if h.shape[0] == 1:
            r = int(choice[0])
            logits = h.new_empty((1, self.num_classes))
            for i, post in enumerate(self.posts):
                if i == r:
                    logits = post(h)
            return logits, choice, gate_logits
        order = torch.argsort(choice, stable=True)
        counts: List[int] = torch.bincount(choice, minlength=len(self.subnets)).tolist()
        groups = h.index_select(0, order).split(counts)
        parts: List[Tensor] = []
        for i, post in enumerate(self.posts):
            if counts[i] > 0:
                parts.append(post(groups[i]))
        sorted_logits = torch.cat(parts)
        logits = torch.empty_like(sorted_logits).index_copy_(0, order, sorted_logits)
        return logits, choice, gate_logits

    def cascade(self, h: Tensor, gate_logits: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """The confidence cascade on gate features h: the slimmest route for every sample, the
        widest too where the slimmest's confidence (``dsnet.policy.confidence``) is under the
        threshold."""
        last = len(self.subnets) - 1
        logits = h.new_empty((h.shape[0], self.num_classes))
        for i, slimmest in enumerate(self.posts):
            if i == 0:
                logits = slimmest(h)
        escalate = confidence(logits, self.cascade_margin) < self.cascade_threshold
        index = escalate.nonzero().squeeze(1)
        if index.numel() > 0:
            for j, widest in enumerate(self.posts):
                if j == last:
                    logits = logits.index_copy(0, index, widest(h.index_select(0, index)))
        return logits, escalate.long() * last, gate_logits


def extract_dynamic(model: DSNet) -> DynamicNet:
    """The dynamic model as plain torch.nn, in eval mode: ``DynamicNet(x)`` equals
    ``model(x, subnet="dynamic")`` with ``model`` in eval mode, under its deployment policy (the
    policy's logit bias is folded into the width head's last bias; the cascade keeps its
    threshold). Shares no storage with ``model``."""
    routes, g = model.routes.dynamic_routes, model.gate_index
    dense = [model.extract(route) for route in routes]
    attention = dense[0].features[g]  # the gate's dense twin at the width it sees
    head = copy.deepcopy(model.gate.width_head)
    if model.policy.bias:
        last = head_output(head)
        with torch.no_grad():
            last.bias += torch.tensor(model.policy.bias, dtype=last.bias.dtype, device=last.bias.device)
    gate = DenseGate(attention.reduce, attention.expand, head)
    posts = [DenseNet(d.features[g + 1:], d.fc, model.drop_rate) for d in dense]
    threshold = model.policy.threshold if model.policy.kind == "cascade" else -1.0
    net = DynamicNet(dense[0].features[:g], gate, posts, model.routing_space, model.num_classes, threshold,
                     model.policy.measure == "margin")
    return net.requires_grad_(False).eval()


# ---- TorchScript --------------------------------------------------------------------------------

@contextmanager
def quiet_deprecations() -> Iterator[None]:
    """Silence torch's deprecation notices for TorchScript and the TorchScript-based ONNX exporter."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", message="The feature will be removed", module=r"torch\.onnx")
        yield


def save_torchscript(module: nn.Module, path: str | os.PathLike) -> None:
    """Script ``module`` (eval mode) and save it; ``torch.jit.load(path)`` needs no dsnet."""
    with quiet_deprecations():
        torch.jit.save(torch.jit.script(module.eval()), str(path))


# ---- dsnet export ----------------------------------------------------------------------------

@dataclass
class _Export:
    """What ``dsnet export`` writes: ``module`` (eval mode), an ``example`` input [B, C, H, W], the
    outputs [B, K] dsnet computes on it (the written file must give them), the weights file's
    metadata, and the module's name in the summary line."""

    module: nn.Module
    example: Tensor
    expected: Tensor
    meta: dict[str, str]
    what: str


def export_command(checkpoint: str, subnet: int | None, dynamic: bool, fmt: str, output: str,
                   input_size: tuple[int, int, int] | None = None, policy: Any = None,
                   onnx_exporter: str = "dynamo") -> str:
    """``dsnet export``: write static subnet ``subnet`` or the gated model (``dynamic``) of a
    supernet checkpoint, or the plain model of a static baseline checkpoint (neither given), as
    ``fmt``; check the file against dsnet on a random batch, return a summary line.

    ``input_size`` (C, H, W) sets the example input (default: the run's ``data.input_size``, else
    the model's); ONNX graphs keep its H and W, TorchScript takes any size. ``policy``
    (``dsnet.policy.Policy``) replaces the checkpoint's deployment policy; ``onnx_exporter`` picks
    ``save_onnx``'s exporter. Raises UserError naming the bad value (format, exporter, subnet,
    route options that do not fit the checkpoint, existing output, missing packages).
    """
    from dsnet.checkpoint import read_checkpoint

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
    if out.exists() or out.is_symlink():
        raise UserError(f"{out} exists; dsnet export never overwrites, choose another -o")
    if fmt == "onnx" and dynamic and out.suffix == ".onnx":
        raise UserError(f"--dynamic --format onnx writes a folder (gate.onnx, route_R.onnx, dynamic.json); "
                         f"give -o a folder name such as {out.with_suffix('')}, not {out}")
    if fmt == "onnx":
        from dsnet.onnx_export import require_onnx

        require_onnx(onnx_exporter)
    if fmt == "safetensors":
        from dsnet.safetensors_export import require_safetensors

        require_safetensors()
    job = _static_export(state, input_size) if static else \
        _supernet_export(checkpoint, state, subnet, dynamic, fmt, input_size, policy)
    with _fresh_output(out) as tmp:
        check = _verify(fmt, _write(job, fmt, tmp, onnx_exporter), job.example, job.expected)
    how = f"onnx ({onnx_exporter} exporter)" if fmt == "onnx" else fmt
    return f"exported {job.what} of {checkpoint} as {how} -> {out} ({check})"


def _example(model: DSNet, state: dict, input_size: Sequence[int] | None) -> Tensor:
    return torch.randn(2, *input_size_of(model, state, input_size), generator=torch.Generator().manual_seed(0))


def _supernet_export(checkpoint: str, state: dict, subnet: int | None, dynamic: bool, fmt: str,
                     input_size: Sequence[int] | None, policy: Any) -> _Export:
    """Static subnet ``subnet`` or the gated model of a supernet checkpoint; as safetensors,
    ``dynamic`` means the whole supernet's weights (checked along its largest route)."""
    from dsnet.checkpoint import build_model
    from dsnet.safetensors_export import weights_meta

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
    example = _example(model, state, input_size)
    if weights:
        module, route, what = model, None, "supernet weights"
    elif dynamic:
        module, route = extract_dynamic(model), "dynamic"
        what = (f"dynamic model (routes = subnets {', '.join(map(str, model.routing_space))}; "
                f"{model.policy.describe(model.routing_space)})")
    else:
        module, route, what = extract_subnet(model, subnet).eval(), subnet, f"subnet {subnet}"
    with torch.no_grad():
        expected = model(example, subnet=route)
    return _Export(module, example, expected, weights_meta(state, "supernet" if subnet is None else str(subnet)), what)


def _static_export(state: dict, input_size: Sequence[int] | None) -> _Export:
    """The plain model of a static baseline checkpoint (``dsnet.baselines.load_static``)."""
    from dsnet.baselines import load_static
    from dsnet.safetensors_export import weights_meta

    model, supernet = load_static(state)
    example = _example(supernet, state, input_size)
    with torch.no_grad():
        expected = model(example)
    kind = {"arch": "an architecture", "largest": "the largest route"}.get(state["subnet"], f"subnet {state['subnet']}")
    from dsnet.sss import scale_keys

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
        from dsnet.onnx_export import run_onnx, write_onnx

        write_onnx(job.module, job.example, path, onnx_exporter)
        return run_onnx(path, job.example.numpy())
    from dsnet.safetensors_export import run_safetensors, save_safetensors

    save_safetensors(job.module, path, job.meta)
    return run_safetensors(job.module, path, job.example).numpy()


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
