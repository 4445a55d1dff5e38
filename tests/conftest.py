"""Shared fixtures: the test device (``TORCH_DEVICE``, default cpu), seeded generators, and a
batch-norm randomizer so that every width's statistics differ and a wrong row shows up; the
records of checked image folders (``dsnet.imagecheck``) kept in a temporary folder, not the user's
cache; and ``tests/require_all.py``'s hooks: under ``DSNET_REQUIRE_ALL=1`` (.ci/run) a skipped test fails."""
from __future__ import annotations

import os
from typing import Callable

import pytest
import torch
from torch import nn

from dsnet.layers import DSBatchNorm2d
from tests.require_all import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def _image_check_records(tmp_path_factory) -> None:
    """``DSNET_CACHE_DIR`` for the session (subprocesses inherit it)."""
    os.environ["DSNET_CACHE_DIR"] = str(tmp_path_factory.mktemp("dsnet-cache"))


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device every test runs on, as timm's tests read it: ``TORCH_DEVICE`` (default cpu)."""
    return torch.device(os.environ.get("TORCH_DEVICE", "cpu"))


@pytest.fixture
def gen() -> torch.Generator:
    """A CPU generator with a fixed seed; tests draw on CPU and move tensors to ``device``."""
    return torch.Generator().manual_seed(0)


def _uniform(shape, low: float, high: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=g) * (high - low) + low


@torch.no_grad()
def randomize_bn_(model: nn.Module, g: torch.Generator, calib: torch.Tensor | None = None) -> nn.Module:
    """Random running statistics (every width row of a DSBatchNorm2d differs) and affine params.

    With ``calib`` (a batch of inputs for a DSNet) the statistics are then re-estimated on it,
    route by route, as BN recalibration does: random statistics that ignore the data would
    let the signal fade through a deep supernet until every input gives the same logits.
    Returns ``model`` in eval mode.
    """
    bns = [m for m in model.modules() if isinstance(m, (DSBatchNorm2d, nn.BatchNorm2d))]
    for m in bns:
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
        m.running_var.copy_(_uniform(m.running_var.shape, 0.5, 2.0, g))
        m.weight.copy_(_uniform(m.weight.shape, 0.5, 1.0, g))
        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    if calib is not None:
        ds_bns = [m for m in bns if isinstance(m, DSBatchNorm2d)]
        momenta = [m.momentum for m in ds_bns]
        for m in ds_bns:
            m.reset_running_stats(momentum=None)
        model.train()
        calib = calib.to(next(model.parameters()).device)
        for subnet in [*range(model.num_subnets), "largest"]:
            model(calib, subnet=subnet)
        for m, momentum in zip(ds_bns, momenta):
            m.momentum = momentum
    return model.eval()


@pytest.fixture
def randomize_bn() -> Callable[[nn.Module, torch.Generator], nn.Module]:
    """``randomize_bn(model, generator, calib=None)``: see ``randomize_bn_``."""
    return randomize_bn_
