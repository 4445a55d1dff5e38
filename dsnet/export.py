"""Subnet extraction and deployment: a route or the gated model as plain torch.nn, TorchScript, ONNX.

``extract_subnet(model, i)`` is static subnet ``i`` as a plain model; ``extract_dynamic(model)`` is
the gated model as one: ``pre`` (the units before the gate, at the routing space's shared base
route), ``gate`` (attention and width head) and one dense ``posts[r]`` per route of the routing
space. Both hold torch.nn layers (and the dense twins of ``dsnet.models.blocks``) only, and both
script with ``torch.jit.script``; the saved files load with ``torch.jit.load`` where dsnet is not
installed.

What ``dsnet export`` writes:

- ``--subnet I --format torchscript``: one TorchScript file; ``--format onnx``: one ONNX file
  (opset 17, input ``input`` [B, C, H, W] -> output ``logits`` [B, K], batch axis dynamic).
- ``--dynamic --format torchscript``: one TorchScript file whose ``forward`` routes each sample
  (gate -> argmax -> group by route -> dense route -> input order), as ``model(x, subnet="dynamic")``;
  ``routed(x)`` also returns each sample's route index and the gate's logits.
- ``--dynamic --format onnx``: a folder, because the routing is data-dependent control flow:

      gate.onnx      input [B, C, H, W] -> features [B, C', H', W'], gate_logits [B, R]
      route_{r}.onnx features [N, C', H', W'] -> logits [N, K], r = 0..R-1 (routing-space order)
      dynamic.json   {"format": "dsnet-dynamic-onnx", "routes": [...], "subnets": [...], ...}

  and the caller routes, as ``DynamicOnnxRunner`` does in twenty lines of numpy and onnxruntime
  (copy it; it needs neither torch nor dsnet).

  One ONNX graph with ``If`` nodes was the alternative. It does export in torch 2.14 (a scripted
  loop over routes with ``nonzero``, not the stable ``argsort`` the exporter refuses, through the
  TorchScript-based exporter) and onnxruntime agrees with dsnet, but it rests on two APIs torch
  2.14 marks deprecated (``torch.jit.script`` and that exporter), onnxruntime warns about implicit
  subgraph inputs on every load, and the dynamo exporter that replaces them needs onnxscript and
  ``torch.cond`` branches over data-dependent group sizes. Graphs without control flow and with a
  dynamic batch axis are the common ground of exporters and ONNX runtimes, and they can be
  quantized or compiled route by route.

TorchScript (``torch.jit.script`` / ``save`` / ``load``) is deprecated upstream, as is the
TorchScript-based ONNX exporter dsnet uses (the dynamo one needs onnxscript, which ``dsnet[onnx]``
does not install); both still work in torch 2.14, and dsnet silences their deprecation warnings
around its own calls, since a user who asked for these formats can do nothing about them.
"""
from __future__ import annotations

import copy
import inspect
import json
import logging
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
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

__all__ = ["extract_subnet", "extract_dynamic", "DynamicNet", "save_torchscript",
           "save_onnx", "save_dynamic_onnx", "DynamicOnnxRunner", "run_dynamic_onnx", "export_command",
           "FORMATS", "OPSET"]

logger = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx", "safetensors")
OPSET = 17
DYNAMIC_ONNX_FORMAT = "dsnet-dynamic-onnx"


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


class _GateStage(nn.Module):
    """``pre`` + ``gate`` of a DynamicNet as one graph (the ``gate.onnx`` of a dynamic export)."""

    def __init__(self, net: DynamicNet) -> None:
        super().__init__()
        self.pre, self.gate = net.pre, net.gate

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        return self.gate.forward_gate(self.pre(x))


# ---- writers ---------------------------------------------------------------------------------

@contextmanager
def _quiet_deprecations() -> Iterator[None]:
    """Silence torch's deprecation notices for TorchScript and the TorchScript-based ONNX exporter."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", message="The feature will be removed", module=r"torch\.onnx")
        yield


def save_torchscript(module: nn.Module, path: str | os.PathLike) -> None:
    """Script ``module`` (eval mode) and save it; ``torch.jit.load(path)`` needs no dsnet."""
    with _quiet_deprecations():
        torch.jit.save(torch.jit.script(module.eval()), str(path))


def save_onnx(module: nn.Module, example: Tensor, path: str | os.PathLike, input_names: Sequence[str],
              output_names: Sequence[str]) -> None:
    """Export ``module(example)`` to ONNX (opset 17, TorchScript-based exporter) with every input
    and output's first axis named ``batch`` and left dynamic."""
    axes = {name: {0: "batch"} for name in (*input_names, *output_names)}
    # torch < 2.5 has only the TorchScript-based exporter and no ``dynamo`` argument
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with _quiet_deprecations():
        torch.onnx.export(module.eval(), (example,), str(path), opset_version=OPSET, input_names=list(input_names),
                          output_names=list(output_names), dynamic_axes=axes, **legacy)


def save_dynamic_onnx(net: DynamicNet, example: Tensor, folder: str | os.PathLike) -> None:
    """Write ``gate.onnx``, one ``route_{r}.onnx`` per route and ``dynamic.json`` into ``folder``.

    example: [B, C, H, W], sets H and W of the graphs (the batch axis stays dynamic).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stage = _GateStage(net).eval()
    save_onnx(stage, example, folder / "gate.onnx", ["input"], ["features", "gate_logits"])
    with torch.no_grad():
        features = stage(example)[0]
    names = [f"route_{r}.onnx" for r in range(len(net.posts))]
    for post, name in zip(net.posts, names):
        save_onnx(post, features, folder / name, ["features"], ["logits"])
    manifest = {"format": DYNAMIC_ONNX_FORMAT, "version": 1, "gate": "gate.onnx", "routes": names,
                "subnets": list(net.subnets), "num_classes": net.num_classes,
                "input_size": list(example.shape[1:]), "opset": OPSET,
                "cascade_threshold": net.cascade_threshold if net.cascade_threshold >= 0 else None,
                "cascade_measure": "margin" if net.cascade_margin else "max"}
    (folder / "dynamic.json").write_text(json.dumps(manifest, indent=2) + "\n")


# ---- running a dynamic ONNX export (numpy + onnxruntime; no torch, no dsnet) -----------------

class DynamicOnnxRunner:
    """Runs a ``dsnet export --dynamic --format onnx`` folder; needs numpy and onnxruntime only
    (``import json; import numpy as np; from pathlib import Path``). Sessions load once.

    ``runner(x)``: x [B, C, H, W] float32 -> logits [B, K], as ``model(x, subnet="dynamic")``.
    """

    def __init__(self, folder, providers=("CPUExecutionProvider",)):
        import onnxruntime as ort

        folder = Path(folder)
        spec = json.loads((folder / "dynamic.json").read_text())
        if spec.get("format") != "dsnet-dynamic-onnx":
            raise ValueError(f"{folder} is not a dsnet dynamic ONNX export (no dsnet-dynamic-onnx dynamic.json)")
        load = lambda name: ort.InferenceSession(str(folder / name), providers=list(providers))  # noqa: E731
        self.gate, self.routes = load(spec["gate"]), [load(name) for name in spec["routes"]]
        self.subnets, self.num_classes = spec["subnets"], spec["num_classes"]
        self.cascade_threshold = spec.get("cascade_threshold")
        self.cascade_margin = spec.get("cascade_measure", "max") == "margin"

    def __call__(self, x):
        features, gate_logits = self.gate.run(None, {"input": np.ascontiguousarray(x, np.float32)})
        if self.cascade_threshold is not None:  # the confidence cascade: slimmest, then widest if unsure
            logits = self.routes[0].run(None, {"features": features})[0]
            z = np.exp(logits - logits.max(1, keepdims=True))
            top = np.sort(z / z.sum(1, keepdims=True), 1)[:, ::-1]  # softmax, descending
            sure = top[:, 0] - top[:, 1] if self.cascade_margin else top[:, 0]
            idx = np.flatnonzero(sure < self.cascade_threshold)
            if idx.size:
                logits[idx] = self.routes[-1].run(None, {"features": features[idx]})[0]
            return logits
        choice = gate_logits.argmax(1)
        logits = np.empty((features.shape[0], self.num_classes), np.float32)
        for r, session in enumerate(self.routes):
            idx = np.flatnonzero(choice == r)
            if idx.size:
                logits[idx] = session.run(None, {"features": features[idx]})[0]
        return logits


def run_dynamic_onnx(folder: str | os.PathLike, x: np.ndarray) -> np.ndarray:
    """x: [B, C, H, W] -> logits [B, K] through a dynamic ONNX export (loads it on every call;
    keep a ``DynamicOnnxRunner`` to run many batches)."""
    return DynamicOnnxRunner(folder)(x)


# ---- dsnet export ----------------------------------------------------------------------------

def export_command(checkpoint: str, subnet: int | None, dynamic: bool, fmt: str, output: str,
                   input_size: tuple[int, int, int] | None = None, policy: Any = None) -> str:
    """``dsnet export``: write static subnet ``subnet`` or the gated model (``dynamic``) of a
    checkpoint as ``fmt``, check the file against dsnet on a random batch, return a summary line.

    ``input_size`` (C, H, W) sets the example input (default: the run's ``data.input_size``, else
    the model's); ONNX graphs keep its H and W, TorchScript takes any size. ``policy``
    (``dsnet.policy.Policy``) replaces the checkpoint's deployment policy. Raises ValueError
    naming the bad value (format, subnet, existing output, missing ONNX packages).
    """
    from dsnet.checkpoint import build_model, read_checkpoint

    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if dynamic == (subnet is not None):
        raise UserError("give exactly one of --subnet I (a static subnet) or --dynamic (the gated model)")
    out = Path(output)
    if out.exists() or out.is_symlink():
        raise UserError(f"{out} exists; dsnet export never overwrites, choose another -o")
    if fmt == "safetensors":  # weights only: --dynamic means the whole supernet
        from dsnet.safetensors_export import export_safetensors

        return export_safetensors(checkpoint, subnet, out)
    if fmt == "onnx" and dynamic and out.suffix == ".onnx":
        raise UserError(f"--dynamic --format onnx writes a folder (gate.onnx, route_R.onnx, dynamic.json); "
                         f"give -o a folder name such as {out.with_suffix('')}, not {out}")
    if fmt == "onnx":
        _require_onnx()
    state = read_checkpoint(checkpoint, ("supernet", "gate"))
    model = build_model(state).eval()
    if policy is not None:
        model.set_policy(policy)
    if subnet is not None and not 0 <= subnet < model.num_subnets:
        raise UserError(f"--subnet {subnet} is out of range: {state['model_name']} has {model.num_subnets} "
                         f"static subnets (0..{model.num_subnets - 1})")
    if dynamic and state.get("stage") != "gate":
        logger.warning("%s is a stage-one checkpoint: its gate's width head is untrained (stage two trains "
                       "it), so the exported dynamic model may send every sample along one route; export "
                       "a train_gate.py checkpoint to ship a trained gate", checkpoint)
    example = torch.randn(2, *_input_size(model, state, input_size), generator=torch.Generator().manual_seed(0))
    module = extract_dynamic(model) if dynamic else extract_subnet(model, subnet).eval()
    with torch.no_grad():
        expected = model(example, subnet="dynamic" if dynamic else subnet)
    with _fresh_output(out) as tmp:
        if fmt == "torchscript":
            save_torchscript(module, tmp)
        elif dynamic:
            save_dynamic_onnx(module, example, tmp)
        else:
            save_onnx(module, example, tmp, ["input"], ["logits"])
        check = _verify(fmt, dynamic, tmp, example, expected)
    what = (f"dynamic model (routes = subnets {', '.join(map(str, model.routing_space))}; "
            f"{model.policy.describe(model.routing_space)})" if dynamic else f"subnet {subnet}")
    return f"exported {what} of {checkpoint} as {fmt} -> {out} ({check})"


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise UserError("--format onnx needs the onnx package: pip install 'dsnet[onnx]'") from None


def _input_size(model: DSNet, state: dict, input_size: Sequence[int] | None) -> tuple[int, int, int]:
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


def _verify(fmt: str, dynamic: bool, path: Path, example: Tensor, expected: Tensor) -> str:
    """Run the written file on ``example``; the largest |difference| from dsnet, as text."""
    if fmt == "torchscript":
        with torch.no_grad(), _quiet_deprecations():
            got = torch.jit.load(str(path))(example).numpy()
    else:
        try:
            import onnxruntime as ort
        except ImportError:
            return "not checked: onnxruntime is not installed"
        if dynamic:
            got = run_dynamic_onnx(path, example.numpy())
        else:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            got = session.run(None, {"input": example.numpy()})[0]
    diff = float(np.abs(got - expected.numpy()).max())
    if not diff <= 1e-3 * max(1.0, float(expected.abs().max())):
        raise ValueError(f"the exported {fmt} file gives outputs {diff:.3g} away from dsnet's; "
                         "this is a dsnet bug, please report it")
    return f"max |diff| vs dsnet {diff:.1e} on a {'x'.join(map(str, example.shape))} input"
