"""BN recalibration against plain ``nn.BatchNorm2d``: every width's statistics, the largest
route's row included, are the cumulative average over the first ``num_batches`` batches."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn
from torch.testing import assert_close

import dsnet  # noqa: F401  (registers the models)
from dsnet.layers import DSBatchNorm2d
from dsnet.train.recalibrate import recalibrate_bn

ROOT = Path(__file__).resolve().parents[1]


def _plain_statistics(model, route, batches):
    """Running statistics of the route's plain twin (``extract``) after a cumulative average
    (momentum=None) over ``batches`` in training mode: one (mean, var) per nn.BatchNorm2d."""
    dense = model.extract(route)
    bns = [m for m in dense.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = None
        bn.reset_running_stats()
    dense.train()
    with torch.no_grad():
        for x in batches:
            dense(x)
    return [(bn.running_mean.clone(), bn.running_var.clone()) for bn in bns]


def test_recalibration_equals_plain_batch_norm_cumulative_averages_per_width(randomize_bn):
    torch.manual_seed(0)
    model = timm.create_model("ds_resnet20", num_classes=4, base_mults=(0.25, 0.5), width_mults=(0.125, 0.25, 0.5))
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 16, 16, generator=g) * (1 + i) + i for i in range(3)]
    randomize_bn(model, g)  # stale statistics everywhere: recalibration must replace all of them
    routes = [model.routes.largest] + model.routes.static_routes
    expected = {r: _plain_statistics(model, r, batches[:2]) for r in routes}  # the third is never read
    ds_bns = [m for m in model.modules() if isinstance(m, DSBatchNorm2d)]
    model.eval()
    recalibrate_bn(model, [(x, torch.zeros(4)) for x in batches], torch.device("cpu"), num_batches=2)
    assert not model.training and all(bn.momentum == 0.1 for bn in ds_bns)
    for route in routes:
        assert len(expected[route]) == len(ds_bns)
        for bn, (mean, var) in zip(ds_bns, expected[route]):
            c = mean.shape[0]
            row = len(bn.choices) if route == model.routes.largest else list(bn.choices).index(c)
            assert_close(bn.running_mean[row, :c], mean, msg=f"{route} mean")
            assert_close(bn.running_var[row, :c], var, msg=f"{route} var")
    assert all(bn.num_batches_tracked[-1] == 2 for bn in ds_bns)  # the largest route counts in its own row


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_recalibration_shared_out_over_two_ranks_equals_one_process_over_every_batch(tmp_path):
    """Five batches over two torchrun ranks (three and two): the merged statistics of every width
    are those one process computes from all five, so no rank needs to run the whole set."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29539",
           str(ROOT / "tests" / "ddp_recal_worker.py"), str(tmp_path), "5"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    merged = torch.load(tmp_path / "merged.pt", weights_only=True)
    torch.manual_seed(0)
    model = timm.create_model("ds_resnet20", num_classes=4, base_mults=(0.25, 0.5), width_mults=(0.125, 0.25, 0.5))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 3, 16, 16, generator=g) * (1 + i), None) for i in range(5)]
    recalibrate_bn(model, batches, torch.device("cpu"), 5)
    single = {k: v for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    assert merged.keys() == single.keys()
    for key in single:
        assert_close(merged[key], single[key], rtol=1e-5, atol=1e-6, msg=key)
