"""TorchScript files: a plain module scripted and saved, loadable with ``torch.jit.load`` alone.

TorchScript (``torch.jit.script`` / ``save`` / ``load``) is deprecated upstream and still works in
torch 2.14; dsnet silences the deprecation warnings around its own calls (and those of the
TorchScript-based ONNX exporter), since a user who asked for the format can do nothing about them.
"""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

__all__ = ["quiet_deprecations", "save_torchscript"]


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
