"""Export: the extracted dynamic model equals the routed supernet; TorchScript files run where dsnet
cannot be imported; ONNX files (static, and the dynamic folder through its runner; the dynamo
exporter by default, the TorchScript-based one on request) equal dsnet's outputs; a static baseline
checkpoint (a subnet, an architecture, SSS's scaled largest route) exports its plain model in every
format; ``export_command`` refuses bad input with one sentence naming the value."""
from __future__ import annotations

import copy
import inspect
import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import timm
import torch
from torch.testing import assert_close

import dsnet
from dsnet.train.checkpoint import save_checkpoint
from dsnet.deploy.export import export_command
from dsnet.deploy.extract import extract_dynamic
from dsnet.deploy.torchscript import quiet_deprecations
from dsnet.deploy.onnx_export import DynamicOnnxRunner, run_dynamic_onnx
from tests.conftest import randomize_bn_

KWARGS = {"num_classes": 4, "base_mults": (0.5, 1.0), "width_mults": (0.25, 0.5, 1.0)}
# float32 comparisons of dense kernels with the supernet's sliced ones, which round differently
TOL = {"rtol": 1e-4, "atol": 1e-5}

# Runs first in every "no dsnet" subprocess: importing dsnet (and any names in BLOCKED) fails.
BLOCKER = textwrap.dedent("""
    import sys
    BLOCKED = {blocked!r}

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is blocked in this test")
            return None

    sys.meta_path.insert(0, Blocker())
    for name in BLOCKED:
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise SystemExit(f"{{name}} could still be imported")
""")


def _spread_gate(model: dsnet.DSNet, x: torch.Tensor) -> None:
    """A hand-set width head whose argmax varies over ``x``: random directions over the gate's
    hidden features, centred on their mean and scaled by their spread (as tests/test_sgs.py)."""
    with torch.no_grad():
        feats = model.forward_units(x, model.routes.dynamic_routes[0], 0, model.gate_index)
        hidden = model.gate.squeeze(feats).flatten(1)
        g = torch.Generator().manual_seed(3)
        weight = torch.randn(model.gate.width_head.out_features, hidden.shape[1], generator=g)
        weight = weight / (hidden @ weight.T).std(0)[:, None].clamp_min(1e-6)
        model.gate.width_head.weight.copy_(weight)
        model.gate.width_head.bias.copy_(-(hidden.mean(0) @ weight.T))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread here: these tiny convs gain nothing from two, and on a busy machine
    two threads that wait for each other make the module several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def supernet(one_thread) -> dsnet.DSNet:
    """A tiny ds_resnet20 in eval mode: BN statistics differ per width, the gate uses every route."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net = timm.create_model("ds_resnet20", **KWARGS)
    x = torch.randn(16, 3, 32, 32, generator=g)
    randomize_bn_(net, g, x)
    _spread_gate(net, x)
    return net


@pytest.fixture
def model(supernet) -> dsnet.DSNet:
    return copy.deepcopy(supernet)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def _checkpoint(model: dsnet.DSNet, path, stage: str = "gate") -> str:
    save_checkpoint({"stage": stage, "model_name": "ds_resnet20", "model_kwargs": KWARGS,
                     "model": model.state_dict(), "config": {"data": {"input_size": 32}}}, path)
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(supernet, tmp_path_factory) -> str:
    return _checkpoint(supernet, tmp_path_factory.mktemp("run") / "gate.pth")


@pytest.fixture(scope="module")
def onnx_exports(checkpoint, tmp_path_factory):
    """(folder, summaries) of the gated model as ``dynamic/`` through the default (dynamo) exporter,
    and of subnet 2 as ``subnet2.onnx`` through the TorchScript-based one, onnxscript unimportable
    (the dynamo exporter's graphs are the routes' ``save_onnx``; it is some twenty times slower)."""
    for package in ("onnx", "onnxruntime", "onnxscript"):
        pytest.importorskip(package)
    folder = tmp_path_factory.mktemp("onnx")
    dynamic = export_command(checkpoint, None, True, "onnx", str(folder / "dynamic"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "onnxscript", None)  # import onnxscript -> ImportError
        static = export_command(checkpoint, 2, False, "onnx", str(folder / "subnet2.onnx"), onnx_exporter="torchscript")
    return folder, [static, dynamic]


def _routes_used(model: dsnet.DSNet, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        choice = model.forward_dynamic(x).choice
    assert len(set(choice.tolist())) >= 2, "the hand-set gate should use several routes"
    return choice


def _one_per_route(choice: torch.Tensor) -> list[int]:
    """The index of the first sample of each route taken (batch-1 inputs that differ in route)."""
    return [choice.tolist().index(r) for r in sorted(set(choice.tolist()))]


def _exporters(path) -> tuple[str, bool]:
    """(the file's ``dsnet.exporter`` metadata, whether its nodes carry the dynamo exporter's own
    ``pkg.torch.onnx.*`` annotations, which the TorchScript-based exporter never writes)."""
    import onnx

    graph = onnx.load(str(path))
    stamp = {p.key: p.value for p in graph.metadata_props}.get("dsnet.exporter")
    return stamp, any(p.key.startswith("pkg.torch.onnx.") for n in graph.graph.node for p in n.metadata_props)


def _run_isolated(code: str, blocked: tuple[str, ...], cwd) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    script = BLOCKER.format(blocked=set(blocked)) + textwrap.dedent(code)
    done = subprocess.run([sys.executable, "-I", "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


# ---- the dynamic model as plain torch.nn ------------------------------------------------------

@torch.no_grad()
def test_extracted_dynamic_model_equals_the_routed_supernet_and_owns_its_weights(model, x, device):
    # float64: the supernet may run a strided 1x1 slice as a matrix product where the dense copy
    # runs a conv kernel; float32 rounding would blur the check
    model, x = model.double().to(device), x.double().to(device)
    choice = _routes_used(model, x)
    net = extract_dynamic(model)
    leaves = [m for m in net.modules() if next(m.children(), None) is None]
    assert all(type(m).__module__.startswith("torch.nn.") for m in leaves), {type(m).__name__ for m in leaves}
    assert not net.training and len(net.posts) == len(model.routing_space)
    storages = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    assert not storages & {t.untyped_storage().data_ptr() for t in net.state_dict().values()}
    logits, got_choice, gate_logits = net.routed(x)
    assert_close(logits, model(x, subnet="dynamic"))
    assert torch.equal(got_choice, choice)
    assert_close(gate_logits, model.forward_gate(x)[1])
    for i in _one_per_route(choice):
        assert_close(net(x[i:i + 1]), model(x[i:i + 1], subnet="dynamic"))


# ---- files --------------------------------------------------------------------------------------

def test_torchscript_files_run_without_dsnet(model, checkpoint, x, tmp_path):
    static_summary = export_command(checkpoint, 1, False, "torchscript", str(tmp_path / "subnet1.pt"))
    dynamic_summary = export_command(checkpoint, None, True, "torchscript", str(tmp_path / "dynamic.pt"))
    assert "subnet 1" in static_summary and "dynamic model" in dynamic_summary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dynamic.pt", "subnet1.pt"]
    choice = _routes_used(model, x)
    single = x[_one_per_route(choice)[-1]][None]
    torch.save({"x": x, "single": single}, tmp_path / "inputs.pt")
    _run_isolated("""
        import torch
        inputs = torch.load("inputs.pt")
        static, dynamic = torch.jit.load("subnet1.pt"), torch.jit.load("dynamic.pt")
        with torch.no_grad():
            out = {"static": static(inputs["x"]), "dynamic": dynamic(inputs["x"]),
                   "single": dynamic(inputs["single"]), "choice": dynamic.routed(inputs["x"])[1]}
        torch.save(out, "outputs.pt")
    """, ("dsnet", "timm"), tmp_path)
    out = torch.load(tmp_path / "outputs.pt")
    with torch.no_grad():
        assert_close(out["static"], model(x, subnet=1), **TOL)
        assert_close(out["dynamic"], model(x, subnet="dynamic"), **TOL)
        assert_close(out["single"], model(single, subnet="dynamic"), **TOL)
    assert torch.equal(out["choice"], choice)


def test_onnx_static_and_dynamic_equal_dsnet(model, onnx_exports, x):
    import onnxruntime as ort

    tmp_path, summaries = onnx_exports
    assert all("max |diff| vs dsnet" in line for line in summaries)
    assert "as onnx (torchscript exporter)" in summaries[0] and "as onnx (dynamo exporter)" in summaries[1]
    assert _exporters(tmp_path / "subnet2.onnx") == ("torchscript", False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dynamic", "subnet2.onnx"]
    folder = tmp_path / "dynamic"
    graphs = ["gate.onnx", "route_0.onnx", "route_1.onnx", "route_2.onnx"]
    assert sorted(p.name for p in folder.iterdir()) == ["dynamic.json", *graphs]
    spec = json.loads((folder / "dynamic.json").read_text())
    assert spec["subnets"] == [0, 1, 2] and spec["num_classes"] == 4 and spec["input_size"] == [3, 32, 32]
    assert spec["exporter"] == "dynamo" and spec["opset"] == 18
    for name in graphs:
        assert _exporters(folder / name) == ("dynamo", True), name
    choice = _routes_used(model, x)
    static = ort.InferenceSession(str(tmp_path / "subnet2.onnx"), providers=["CPUExecutionProvider"])
    runner = DynamicOnnxRunner(folder)
    with torch.no_grad():
        for batch in (x, x[:3], *(x[i:i + 1] for i in _one_per_route(choice))):
            assert_close(torch.from_numpy(static.run(None, {"input": batch.numpy()})[0]), model(batch, subnet=2), **TOL)
            assert_close(torch.from_numpy(runner(batch.numpy())), model(batch, subnet="dynamic"), **TOL)
    assert_close(torch.from_numpy(run_dynamic_onnx(folder, x.numpy())), torch.from_numpy(runner(x.numpy())))


def test_the_dynamic_onnx_runner_is_copyable_without_torch_or_dsnet(model, onnx_exports, x, tmp_path):
    (tmp_path / "dynamic").symlink_to(onnx_exports[0] / "dynamic")
    np.save(tmp_path / "x.npy", x.numpy())
    (tmp_path / "runner.py").write_text("import json\nimport numpy as np\nfrom pathlib import Path\n\n\n"
                                        + inspect.getsource(DynamicOnnxRunner))
    _run_isolated("""
        import numpy as np
        exec(open("runner.py").read())
        np.save("y.npy", DynamicOnnxRunner("dynamic")(np.load("x.npy")))
    """, ("dsnet", "torch", "timm"), tmp_path)
    with torch.no_grad():
        assert_close(torch.from_numpy(np.load(tmp_path / "y.npy")), model(x, subnet="dynamic"), **TOL)


# ---- export_command errors --------------------------------------------------------------------

@pytest.mark.parametrize("subnet", [3, -1])
def test_subnet_out_of_range_names_the_index(checkpoint, tmp_path, subnet):
    with pytest.raises(ValueError, match=rf"--subnet {subnet} is out of range: ds_resnet20 has 3 static subnets \(0\.\.2\)"):
        export_command(checkpoint, subnet, False, "torchscript", str(tmp_path / "out.pt"))
    assert not (tmp_path / "out.pt").exists()


def test_existing_output_is_refused(checkpoint, tmp_path):
    (tmp_path / "out.pt").write_text("keep me")
    with pytest.raises(ValueError, match=r"out\.pt exists; dsnet export never overwrites"):
        export_command(checkpoint, 0, False, "torchscript", str(tmp_path / "out.pt"))
    assert (tmp_path / "out.pt").read_text() == "keep me"


def test_unknown_format_and_route_choice_are_named(checkpoint, tmp_path):
    ckpt, out = checkpoint, str(tmp_path / "out")
    with pytest.raises(ValueError, match=r"unknown export format 'tflite'; choose one of torchscript, onnx"):
        export_command(ckpt, 0, False, "tflite", out)
    for subnet, dynamic in ((None, False), (0, True)):
        with pytest.raises(ValueError, match=r"exactly one of --subnet I .* or --dynamic"):
            export_command(ckpt, subnet, dynamic, "torchscript", out)
    with pytest.raises(ValueError, match=r"--input-size must be C H W with C = 3.*got \[1, 32, 32\]"):
        export_command(ckpt, 0, False, "torchscript", out, (1, 32, 32))
    with pytest.raises(ValueError, match=r"writes a folder .* such as .*dyn, not .*dyn\.onnx"):
        export_command(ckpt, None, True, "onnx", str(tmp_path / "dyn.onnx"))
    with pytest.raises(ValueError, match=r"unknown ONNX exporter 'legacy'; choose one of dynamo, torchscript"):
        export_command(ckpt, 0, False, "onnx", out, onnx_exporter="legacy")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("missing, exporter", [("onnx", "dynamo"), ("onnxscript", "dynamo"), ("onnx", "torchscript")])
def test_onnx_without_the_package_says_how_to_install(checkpoint, tmp_path, monkeypatch, missing, exporter):
    monkeypatch.setitem(sys.modules, missing, None)  # import MISSING -> ImportError
    with pytest.raises(ValueError, match=rf"the {exporter} exporter needs the {missing} package: pip install 'dsnet\[onnx\]'"):
        export_command(checkpoint, 0, False, "onnx", str(tmp_path / "a.onnx"), onnx_exporter=exporter)
    assert list(tmp_path.iterdir()) == []



def test_dynamic_export_of_a_stage_one_checkpoint_warns(model, tmp_path, caplog):
    with torch.no_grad():
        model.gate.width_head.weight.zero_()
        model.gate.width_head.bias.zero_()
    ckpt = _checkpoint(model, tmp_path / "last.pth", stage="supernet")
    with caplog.at_level(logging.WARNING, logger="dsnet.deploy.export"):
        summary = export_command(ckpt, None, True, "torchscript", str(tmp_path / "dynamic.pt"))
    assert "stage-one checkpoint" in caplog.text and "width head is untrained" in caplog.text
    assert (tmp_path / "dynamic.pt").is_file() and summary.startswith("exported dynamic model")


# ---- static baseline checkpoints: the plain model, in every format ------------------------------

STATIC_KINDS = ("subnet", "arch", "sss")


def static_checkpoints(folder) -> dict[str, tuple[str, torch.nn.Module]]:
    """kind -> (path, the plain model it holds, eval mode): stage-``static`` checkpoints as
    ``dsnet train-baseline`` writes them (model name and kwargs, the plain model's weights, its
    ``subnet``, the run's config), made without training from a tiny ds_resnet20 with random BN:

    - ``subnet``: static subnet 1;
    - ``arch``: an architecture with odd widths (about half of each space) and block 2 removed;
    - ``sss``: the largest route with SSS's branch factors, one of them zero.
    """
    from dsnet.prune.arch import architecture, build_plain, full_architecture
    from dsnet.prune.sss import add_scales

    g = torch.Generator().manual_seed(5)
    supernet = timm.create_model("ds_resnet20", **KWARGS)
    randomize_bn_(supernet, g, torch.randn(16, 3, 32, 32, generator=g))
    full = full_architecture(supernet, [2])
    arch = architecture(supernet, {n: (w // 2) | 1 for n, w in full.widths.items()}, [2])
    sss = supernet.extract(supernet.routes.largest)
    scales = add_scales(sss, supernet)
    with torch.no_grad():
        for scale, value in zip(scales, torch.rand(len(scales), generator=g) * 2):
            scale.fill_(value)
        scales[1].zero_()
    models = {"subnet": (1, supernet.extract(supernet.routes.static(1)), {}),
              "arch": ("arch", build_plain(supernet, arch), {"architecture": arch.to_dict()}),
              "sss": ("largest", sss, {})}
    out = {}
    for kind, (subnet, plain, extra) in models.items():
        path = folder / f"{kind}.pth"
        save_checkpoint({"stage": "static", "model_name": "ds_resnet20", "model_kwargs": KWARGS,
                         "model": plain.state_dict(), "subnet": subnet, "config": {"data": {"input_size": 32}},
                         **extra}, path)
        out[kind] = (str(path), plain.eval())
    return out


@pytest.fixture(scope="module")
def statics(tmp_path_factory, one_thread):
    return static_checkpoints(tmp_path_factory.mktemp("static"))


def _from_weights(path) -> torch.nn.Module:
    """The plain model rebuilt from a safetensors file and its metadata alone (no checkpoint)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from dsnet.prune.arch import Architecture, build_plain
    from dsnet.prune.sss import add_scales

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    supernet = timm.create_model(meta["model_name"], **json.loads(meta["model_kwargs"]))
    if meta["subnet"] == "arch":
        model = build_plain(supernet, Architecture.from_dict(json.loads(meta["architecture"])))
    else:
        model = supernet.extract(supernet.routes.resolve(meta["subnet"] if meta["subnet"] == "largest"
                                                         else int(meta["subnet"])))
    weights = load_file(str(path))
    if any(k.endswith(".scale") for k in weights):
        add_scales(model, supernet)
    model.load_state_dict(weights)
    return model.eval()


@pytest.mark.parametrize("kind", STATIC_KINDS)
def test_a_static_checkpoint_exports_its_plain_model_in_every_format(statics, kind, x, tmp_path):
    ort = pytest.importorskip("onnxruntime")

    path, plain = statics[kind]
    for fmt, name in (("torchscript", "m.pt"), ("onnx", "m.onnx"), ("safetensors", "m.safetensors")):
        summary = export_command(path, None, False, fmt, str(tmp_path / name), onnx_exporter="torchscript")
        assert summary.startswith("exported the baseline model (") and "max |diff| vs dsnet" in summary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.pt", "m.safetensors"]
    with torch.no_grad(), quiet_deprecations():
        expected = plain(x)
        assert_close(torch.jit.load(str(tmp_path / "m.pt"))(x), expected, **TOL)
        assert_close(_from_weights(tmp_path / "m.safetensors")(x), expected, rtol=0, atol=0)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert_close(torch.from_numpy(session.run(None, {"input": x.numpy()})[0]), expected, **TOL)


def test_route_options_with_a_static_checkpoint_are_one_sentence(statics, tmp_path, capsys):
    from dsnet.cli import main

    path = statics["arch"][0]
    for route in (["--subnet", "0"], ["--dynamic"]):
        assert main(["export", path, *route, "--format", "torchscript", "-o", str(tmp_path / "m.pt")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"dsnet export: error: {path} is a static baseline checkpoint holding one plain model; "
                       "export it without --subnet, --dynamic or --target-madds"]
    assert list(tmp_path.iterdir()) == []


def test_a_supernet_checkpoint_still_needs_a_route(checkpoint, tmp_path, capsys):
    from dsnet.cli import main

    assert main(["export", checkpoint, "--format", "torchscript", "-o", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "give exactly one of --subnet I (a static subnet) or --dynamic" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_a_written_file_that_differs_from_the_model_is_refused_and_removed(statics, tmp_path, monkeypatch):
    import dsnet.deploy.export

    def perturbed(module, path):
        wrong = copy.deepcopy(module)
        with torch.no_grad():
            wrong.fc.bias += 1.0
        save_torchscript(wrong, path)

    save_torchscript = dsnet.deploy.export.save_torchscript
    monkeypatch.setattr(dsnet.deploy.export, "save_torchscript", perturbed)
    with pytest.raises(ValueError, match=r"the exported torchscript file gives outputs 1 away from dsnet's; "
                                         r"this is a dsnet bug"):
        export_command(statics["sss"][0], None, False, "torchscript", str(tmp_path / "m.pt"))
    assert list(tmp_path.iterdir()) == []


# ---- the shipped policy travels with the weights (issue 28) -------------------------------------

def _shipped_checkpoint(supernet, path, ema: bool = False) -> tuple[str, dsnet.DSNet]:
    """A stage-two checkpoint shipping the static fallback on route 0 (the hand-set gate spreads
    samples over every route, so a dropped policy shows), optionally with an EMA copy that differs."""
    from dsnet.train.policy_select import static_policy

    policy = static_policy(0, len(supernet.routing_space))
    state = {"stage": "gate", "model_name": "ds_resnet20", "model_kwargs": KWARGS, "model": supernet.state_dict(),
             "config": {"data": {"input_size": 32}}, "deploy": {"policy": policy.to_dict()}}
    if ema:
        state["ema"] = {k: v + 1 if v.is_floating_point() else v for k, v in supernet.state_dict().items()}
    save_checkpoint(state, path)
    shipped = dsnet.load_checkpoint(path)
    assert shipped.policy == policy
    return str(path), shipped


def test_a_dynamic_safetensors_export_routes_as_the_checkpoint_without_dsnets_checkpoint(supernet, x, tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    path, shipped = _shipped_checkpoint(supernet, tmp_path / "gate.pth")
    summary = export_command(path, None, True, "safetensors", str(tmp_path / "all.safetensors"))
    by_torch = timm.create_model("ds_resnet20", **KWARGS).eval()
    by_torch.load_state_dict(load_file(tmp_path / "all.safetensors"))
    by_timm = timm.create_model("ds_resnet20", pretrained=True,
                                pretrained_cfg_overlay=dict(file=str(tmp_path / "all.safetensors"))).eval()
    with torch.no_grad():
        expected = shipped(x, subnet="dynamic")
        assert not torch.equal(supernet(x, subnet="dynamic"), expected)  # the plain gate routes otherwise
        for model in (by_torch, by_timm):
            assert_close(model(x, subnet="dynamic"), expected, rtol=0, atol=0)
            assert model.policy == shipped.policy
    assert "(largest route and dynamic model)" in summary and "static subnet 0 (fallback)" in summary


def test_the_export_check_runs_the_dynamic_model_of_a_safetensors_file(supernet, tmp_path, monkeypatch):
    pytest.importorskip("safetensors")
    from safetensors import torch as st

    from dsnet.models.policy import POLICY_KEY

    path, _ = _shipped_checkpoint(supernet, tmp_path / "gate.pth")

    real = st.save_file
    monkeypatch.setattr(st, "save_file", lambda t, p, metadata=None: real(
        {k: v for k, v in t.items() if k != POLICY_KEY}, p, metadata=metadata))  # a writer that drops the policy
    with pytest.raises(ValueError, match="this is a dsnet bug"):
        export_command(path, None, True, "safetensors", str(tmp_path / "all.safetensors"))
    assert not (tmp_path / "all.safetensors").exists()


def test_timm_loads_a_dsnet_checkpoint_as_dsnet_evaluates_it(supernet, x, tmp_path):
    path, shipped = _shipped_checkpoint(supernet, tmp_path / "gate.pth", ema=True)
    by_file = timm.create_model("ds_resnet20", pretrained=True, pretrained_cfg_overlay=dict(file=path)).eval()
    by_path = timm.create_model("ds_resnet20", **KWARGS, checkpoint_path=path).eval()
    with torch.no_grad():
        expected = shipped(x, subnet="dynamic")
        for model in (by_file, by_path):  # the model weights (not the EMA copy) and the shipped policy
            assert model.policy == shipped.policy
            assert_close(model.state_dict()["classifier.weight"], supernet.state_dict()["classifier.weight"])
            assert_close(model(x, subnet="dynamic"), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="pass pretrained_cfg_overlay=dict"):
        timm.create_model("ds_resnet20", pretrained=True)
    with pytest.raises(ValueError, match="holds ds_resnet20, not ds_resnet56"):
        timm.create_model("ds_resnet56", pretrained=True, pretrained_cfg_overlay=dict(file=path))
    with pytest.raises(ValueError, match="does not fit ds_resnet20"):
        timm.create_model("ds_resnet20", pretrained=True, num_classes=9, pretrained_cfg_overlay=dict(file=path))
