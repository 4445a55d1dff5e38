"""dsnet bench: the JSON contract (of a supernet, and of a static baseline checkpoint, whose timed
paths are its plain model and the dense largest route), and the masking baseline of
benchmarks/bench_dynamic.py computes exactly what the routed dynamic model computes (so the
comparison is fair)."""
import importlib.util
import json
from pathlib import Path

import pytest
import timm
import torch
from torch.testing import assert_close
from torch.utils.flop_counter import FlopCounterMode

import dsnet  # noqa: F401
from dsnet.deploy.bench import bench_command, bench_threads, spread_gate

ROOT = Path(__file__).resolve().parents[1]


def _bench_dynamic():
    spec = importlib.util.spec_from_file_location("bench_dynamic", ROOT / "benchmarks" / "bench_dynamic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_command_follows_the_json_contract(tmp_path, capsys):
    path = tmp_path / "bench.json"
    report = bench_command("ds_resnet20", [1, 4], str(path), repeats=2, threads=1, warmup=1, min_ms=1.0)
    assert json.loads(path.read_text()) == report
    assert set(report) == {"device", "threads", "results"}
    assert isinstance(report["device"], str) and report["threads"] == 1
    assert [r["batch_size"] for r in report["results"]] == [1, 4]
    num_subnets = timm.create_model("ds_resnet20").num_subnets
    for row in report["results"]:
        assert set(row) == {"batch_size", "images", "largest_ms", "dynamic_ms", "largest_madds", "dynamic_madds_mean",
                            "theoretical_speedup", "realized_speedup", "dense_limit_ms", "subnets"}
        assert isinstance(row["largest_madds"], int)
        for key in ("largest_ms", "dynamic_ms", "dense_limit_ms", "dynamic_madds_mean", "realized_speedup"):
            assert isinstance(row[key], float) and row[key] > 0
        assert row["theoretical_speedup"] == row["largest_madds"] / row["dynamic_madds_mean"]
        assert row["realized_speedup"] == row["largest_ms"] / row["dynamic_ms"]
        assert [s["subnet"] for s in row["subnets"]] == list(range(num_subnets))
        for s in row["subnets"]:
            assert set(s) == {"subnet", "madds", "supernet_ms", "dense_ms"} and isinstance(s["madds"], int)
            assert s["supernet_ms"] > 0 and s["dense_ms"] > 0
    assert "dense limit" in capsys.readouterr().out


def test_bench_command_names_a_bad_target():
    with pytest.raises(ValueError, match="neither an existing checkpoint file nor a dsnet model"):
        bench_command("no_such_model", [1], None, 1, 1)


def _check_masked_equals_routed(name, seed, randomize_bn, **kwargs):
    with bench_threads(1):  # one thread: OpenMP barriers crawl on a loaded machine
        _masked_equals_routed(name, seed, randomize_bn, **kwargs)


def _masked_equals_routed(name, seed, randomize_bn, **kwargs):
    torch.manual_seed(seed)
    model = timm.create_model(name, **kwargs)
    size = model.default_input_size
    g = torch.Generator().manual_seed(seed)
    randomize_bn(model, g, torch.randn(8, *size, generator=g))
    x = torch.randn(16, *size, generator=g)
    spread_gate(model, x)
    with torch.inference_mode():
        choice = model.forward_gate(x)[1].argmax(1)
        assert len(set(choice.tolist())) >= 2, "the hand-set gate should use several routes"
        for full_width in (True, False):  # the routing space stops short of the full width
            masked = _bench_dynamic().MaskedDynamic(model, full_width).eval()
            assert_close(masked(x), model(x, subnet="dynamic"), rtol=1e-4, atol=1e-4)


def test_masked_forward_equals_routed_dynamic_resnet(randomize_bn):
    _check_masked_equals_routed("ds_resnet20", 0, randomize_bn, num_classes=4, base_mults=(0.5, 1.0),
                                width_mults=(0.25, 0.5, 1.0), routing_space=(0, 1))


def test_masked_forward_equals_routed_dynamic_mobilenet(randomize_bn):
    from dsnet.models.mobilenet_v1 import build_mobilenet_v1
    from dsnet.models.spec import StageSpec

    stages = (StageSpec(choices=(8, 16), depth=1, stride=2, group=0),
              StageSpec(choices=(16, 24, 32), depth=2, stride=2, group=1, gated=True),
              StageSpec(choices=(32, 40, 48), depth=1, stride=2, group=1))
    with bench_threads(1):
        _mobilenet_masked_equals_routed(stages, build_mobilenet_v1, randomize_bn)


def _mobilenet_masked_equals_routed(stages, build_mobilenet_v1, randomize_bn):
    torch.manual_seed(1)
    model = build_mobilenet_v1((8, 16), stages, 5, (0, 1))
    model.default_input_size = (3, 32, 32)
    g = torch.Generator().manual_seed(1)
    randomize_bn(model, g, torch.randn(8, 3, 32, 32, generator=g))
    x = torch.randn(16, 3, 32, 32, generator=g)
    spread_gate(model, x)
    with torch.inference_mode():
        assert len(set(model.forward_gate(x)[1].argmax(1).tolist())) >= 2
        for full_width in (True, False):
            masked = _bench_dynamic().MaskedDynamic(model, full_width).eval()
            assert_close(masked(x), model(x, subnet="dynamic"), rtol=1e-4, atol=1e-4)


def test_bench_dynamic_reports_batches_and_a_single_image_stream(tmp_path):
    """One row per batch size plus one for the stream of single images; the stream's routing
    counts its images and the theoretical ratio is the largest route's MAdds over their mean."""
    path = tmp_path / "dynamic.json"
    _bench_dynamic().main(["--models", "ds_resnet20", "--batch-sizes", "4", "--repeats", "1", "--warmup", "0",
                           "--min-ms", "0", "--threads", "1", "--stream", "3", "--json", str(path)])
    report = json.loads(path.read_text())
    assert report["seed"] == 0 and [(r["batch_size"], r["stream"]) for r in report["results"]] == [(4, None), (1, 3)]
    batch, stream = report["results"]
    assert sum(batch["routing"]) == 4 and sum(stream["routing"]) == 3
    model = timm.create_model("ds_resnet20")
    largest = model.route_cost(model.routes.largest).madds
    costs = model.dynamic_costs()
    mean = sum(c * n for c, n in zip(costs, stream["routing"])) / 3
    assert stream["theoretical_speedup"] == pytest.approx(largest / mean)
    for row in report["results"]:
        assert row["dynamic_over_dense_limit"] == row["dynamic_ms"] / row["dense_limit_ms"]
        assert row["masked_over_dynamic"] == row["masked_ms"] / row["dynamic_ms"]


@pytest.fixture(scope="module")
def arch_checkpoint(tmp_path_factory):
    """(path, plain model) of a static checkpoint holding an architecture (tests/test_export.py)."""
    from tests.test_export import static_checkpoints

    return static_checkpoints(tmp_path_factory.mktemp("static"))["arch"]


def test_bench_of_a_static_checkpoint_times_its_plain_model_against_the_dense_largest_route(arch_checkpoint, tmp_path,
                                                                                            capsys):
    from dsnet.prune.arch import Architecture, arch_cost
    from dsnet.train.checkpoint import read_checkpoint
    from tests.test_export import KWARGS

    path = arch_checkpoint[0]
    out = tmp_path / "bench.json"
    report = bench_command(path, [1, 3], str(out), repeats=2, threads=1, warmup=1, min_ms=1.0)
    assert json.loads(out.read_text()) == report and set(report) == {"device", "threads", "results"}
    supernet = timm.create_model("ds_resnet20", **KWARGS)
    arch = Architecture.from_dict(read_checkpoint(path, "static")["architecture"])
    madds = arch_cost(supernet, arch, (3, 32, 32)).madds
    largest = supernet.route_cost(supernet.routes.largest, (3, 32, 32)).madds
    assert [r["batch_size"] for r in report["results"]] == [1, 3]
    for row in report["results"]:
        assert set(row) == {"batch_size", "static_ms", "largest_ms", "static_madds", "largest_madds",
                            "theoretical_speedup", "realized_speedup"}
        assert (row["static_madds"], row["largest_madds"]) == (madds, largest) and madds < largest
        assert row["theoretical_speedup"] == largest / madds
        assert row["static_ms"] > 0 and row["largest_ms"] > 0
        assert row["realized_speedup"] == row["largest_ms"] / row["static_ms"]
    printed = capsys.readouterr().out
    assert "static model" in printed and "dense largest route" in printed and "realized" in printed


def test_bench_of_a_static_checkpoint_times_the_plain_model_and_the_largest_route(arch_checkpoint, monkeypatch):
    """What each timed path computes, counted by FlopCounterMode in place of the clock."""
    import dsnet.deploy.bench
    from tests.test_export import KWARGS

    path, plain = arch_checkpoint
    counted, batch = {}, []

    def count(fns, *args, **kwargs):
        for name, fn in fns.items():
            with FlopCounterMode(display=False) as counter:
                fn()
            counted[name] = counter.get_total_flops()
        return {"static": 1.0, "largest": 3.0}

    monkeypatch.setattr(dsnet.deploy.bench, "time_interleaved", count)
    monkeypatch.setattr(dsnet.deploy.bench, "_val_images", lambda cfg, runtime, n: batch.append(n) or torch.randn(n, 3, 32, 32))
    row = bench_command(path, [2], None, repeats=1, threads=1)["results"][0]
    assert batch == [64] and row["realized_speedup"] == 3.0  # the mix of --images (64), of which it times 2
    supernet = timm.create_model("ds_resnet20", **KWARGS)
    expected = {}
    for name, model in (("static", plain), ("largest", supernet.extract(supernet.routes.largest).eval())):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.randn(2, 3, 32, 32))
        expected[name] = counter.get_total_flops()
    assert counted == expected and expected["static"] < expected["largest"]


def test_bench_at_batch_one_times_and_reports_the_mean_madds_of_the_whole_mix(tmp_path, monkeypatch):
    """Batch 1 runs the dynamic model over every image of the mix (counted by FlopCounterMode in
    place of the clock) and reports their mean MAdds, not the first image's."""
    import dsnet.deploy.bench
    from tests.test_export import _checkpoint, _routes_used

    model = timm.create_model("ds_resnet20", num_classes=4, base_mults=(0.5, 1.0), width_mults=(0.25, 0.5, 1.0)).eval()
    x = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    spread_gate(model, x)
    choice = _routes_used(model, x)
    path = _checkpoint(model, tmp_path / "gate.pth")
    counted = {}

    def count(fns, *args, **kwargs):
        with FlopCounterMode(display=False) as counter:
            fns["dynamic"]()
        counted["dynamic"] = counter.get_total_flops()
        return {name: 1.0 for name in fns}

    monkeypatch.setattr(dsnet.deploy.bench, "time_interleaved", count)
    monkeypatch.setattr(dsnet.deploy.bench, "_val_images", lambda cfg, runtime, n: x)
    row = bench_command(path, [1], None, repeats=1, threads=1, images=12, progress=False)["results"][0]
    costs = model.policy_costs((3, 32, 32))
    assert row["images"] == 12
    assert row["dynamic_madds_mean"] == sum(costs[c] for c in choice.tolist()) / 12
    assert row["dynamic_madds_mean"] != costs[choice[0]]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        for i in range(12):
            model(x[i:i + 1], subnet="dynamic")
    assert counted["dynamic"] == counter.get_total_flops()
