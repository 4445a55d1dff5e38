"""ONNX export of a static subnet (one graph) and of the gated model (a folder of graphs).

- ``dsnet export --subnet I --format onnx``: one graph, input ``input`` [B, C, H, W] -> output
  ``logits`` [B, K], opset ``OPSET``, batch axis dynamic, H and W those of the example input.
- ``dsnet export --dynamic --format onnx``: a folder, because the routing is data-dependent control flow:

      gate.onnx      input [B, C, H, W] -> features [B, C', H', W'], gate_logits [B, R]
      route_{r}.onnx features [N, C', H', W'] -> logits [N, K], r = 0..R-1 (routing-space order)
      dynamic.json   {"format": "dsnet-dynamic-onnx", "routes": [...], "subnets": [...], ...}

  and the caller routes, as ``DynamicOnnxRunner`` does in twenty lines of numpy and onnxruntime
  (copy it; it needs neither torch nor dsnet).

  One ONNX graph with ``If`` nodes was the alternative: it needs a scripted loop over routes and
  the TorchScript-based exporter (the dynamo exporter would need ``torch.cond`` branches over
  data-dependent group sizes), and onnxruntime warns about implicit subgraph inputs on every load.
  Graphs without control flow and with a dynamic batch axis are the common ground of exporters and
  ONNX runtimes, and they can be quantized or compiled route by route.

Every ONNX graph (the static subnet, ``gate.onnx``, each ``route_{r}.onnx``) goes through the
exporter torch recommends, ``torch.onnx.export(..., dynamo=True)`` on ``torch.export`` (needs
onnxscript, in ``dsnet[onnx]``); ``--onnx-exporter torchscript`` picks the TorchScript-based one,
which torch deprecates but still ships, and which exports some twenty times faster. Each file's
``metadata_props`` (``dsnet.exporter``) and ``dynamic.json`` (``exporter``) name the one used.
dsnet silences both exporters' deprecation notices and the dynamo exporter's progress lines around
its own calls, since a user who asked for ONNX can do nothing about them.
"""
from __future__ import annotations

import inspect
import io
import json
import os
import warnings
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Iterator, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from dsnet.deploy.extract import DynamicNet
from dsnet.deploy.torchscript import quiet_deprecations
from dsnet.errors import UserError

__all__ = ["save_onnx", "save_dynamic_onnx", "write_onnx", "run_onnx", "DynamicOnnxRunner", "run_dynamic_onnx",
           "require_onnx", "ONNX_EXPORTERS", "OPSET"]

OPSET = 18
ONNX_EXPORTERS = ("dynamo", "torchscript")  # the first is the default
DYNAMIC_ONNX_FORMAT = "dsnet-dynamic-onnx"


class _GateStage(nn.Module):
    """``pre`` + ``gate`` of a DynamicNet as one graph (the ``gate.onnx`` of a dynamic export)."""

    def __init__(self, net: DynamicNet) -> None:
        super().__init__()
        self.pre, self.gate = net.pre, net.gate

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        return self.gate.forward_gate(self.pre(x))


@contextmanager
def _quiet_dynamo() -> Iterator[None]:
    """Keep the dynamo exporter's progress lines (``[torch.onnx] ...``, printed to stdout) and its
    informational warnings out of ``dsnet export``'s output; errors still raise."""
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def save_onnx(module: nn.Module, example: Tensor, path: str | os.PathLike, input_names: Sequence[str],
              output_names: Sequence[str], exporter: str = "dynamo") -> None:
    """Export ``module(example)`` to ONNX (opset ``OPSET``) with every input and output's first axis
    named ``batch`` and left dynamic; the file's metadata ``dsnet.exporter`` names the exporter.

    exporter: "dynamo" (``torch.onnx.export(dynamo=True)``, on ``torch.export``; needs onnxscript)
    or "torchscript" (the TorchScript-based exporter torch deprecates).
    """
    module, names = module.eval(), {"input_names": list(input_names), "output_names": list(output_names)}
    if exporter == "dynamo":
        with _quiet_dynamo():
            torch.onnx.export(module, (example,), str(path), dynamo=True, opset_version=OPSET,
                              dynamic_shapes=({0: "batch"},), external_data=False, verbose=False, **names)
    else:
        axes = {name: {0: "batch"} for name in (*input_names, *output_names)}
        # torch < 2.5 has only the TorchScript-based exporter and no ``dynamo`` argument
        legacy = {"dynamo": False} if _has_dynamo_exporter() else {}
        with quiet_deprecations():
            torch.onnx.export(module, (example,), str(path), opset_version=OPSET, dynamic_axes=axes, **names,
                              **legacy)
    _stamp_exporter(path, exporter)


def _has_dynamo_exporter() -> bool:
    return "dynamo" in inspect.signature(torch.onnx.export).parameters


def _stamp_exporter(path: str | os.PathLike, exporter: str) -> None:
    """Record ``exporter`` in the ONNX file's ``metadata_props`` as ``dsnet.exporter``."""
    import onnx

    model = onnx.load(str(path))
    model.metadata_props.add(key="dsnet.exporter", value=exporter)
    onnx.save(model, str(path))


def save_dynamic_onnx(net: DynamicNet, example: Tensor, folder: str | os.PathLike,
                      exporter: str = "dynamo") -> None:
    """Write ``gate.onnx``, one ``route_{r}.onnx`` per route and ``dynamic.json`` into ``folder``.

    example: [B, C, H, W], sets H and W of the graphs (the batch axis stays dynamic). exporter: as
    ``save_onnx``, for every graph; ``dynamic.json`` records it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stage = _GateStage(net).eval()
    save_onnx(stage, example, folder / "gate.onnx", ["input"], ["features", "gate_logits"], exporter)
    with torch.no_grad():
        features = stage(example)[0]
    names = [f"route_{r}.onnx" for r in range(len(net.posts))]
    for post, name in zip(net.posts, names):
        save_onnx(post, features, folder / name, ["features"], ["logits"], exporter)
    manifest = {"format": DYNAMIC_ONNX_FORMAT, "version": 1, "gate": "gate.onnx", "routes": names,
                "subnets": list(net.subnets), "num_classes": net.num_classes,
                "input_size": list(example.shape[1:]), "opset": OPSET, "exporter": exporter,
                "cascade_threshold": net.cascade_threshold if net.cascade_threshold >= 0 else None,
                "cascade_measure": "margin" if net.cascade_margin else "max"}
    (folder / "dynamic.json").write_text(json.dumps(manifest, indent=2) + "\n")


def write_onnx(module: nn.Module, example: Tensor, path: str | os.PathLike, exporter: str = "dynamo") -> None:
    """A ``DynamicNet`` as a folder (``save_dynamic_onnx``), any other module as one graph
    ``input`` [B, C, H, W] -> ``logits`` [B, K] (``save_onnx``)."""
    if isinstance(module, DynamicNet):
        save_dynamic_onnx(module, example, path, exporter)
    else:
        save_onnx(module, example, path, ["input"], ["logits"], exporter)


def run_onnx(path: str | os.PathLike, x: np.ndarray) -> np.ndarray | None:
    """x: [B, C, H, W] -> logits [B, K] through what ``write_onnx`` wrote; None without onnxruntime."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    if Path(path).is_dir():
        return run_dynamic_onnx(path, x)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


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


def require_onnx(exporter: str) -> None:
    """Refuse an unknown exporter, or one whose packages are missing, before any work."""
    if exporter not in ONNX_EXPORTERS:
        raise UserError(f"unknown ONNX exporter {exporter!r}; choose one of {', '.join(ONNX_EXPORTERS)}")
    if exporter == "dynamo" and not _has_dynamo_exporter():
        raise UserError(f"torch {torch.__version__} has no dynamo ONNX exporter; "
                        "use --onnx-exporter torchscript or a newer torch")
    packages = ("onnx", "onnxscript") if exporter == "dynamo" else ("onnx",)
    for package in packages:
        try:
            __import__(package)
        except ImportError:
            raise UserError(f"--format onnx with the {exporter} exporter needs the {package} package: "
                            "pip install 'dsnet[onnx]'") from None
