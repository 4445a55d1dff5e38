"""dsnet search: greedy slimming on hand-made supernets with known answers (a channel space planted
useless goes first), each candidate scored from its first unit as from the input, the exact cost and
the stop of the architecture found, its plain model against the supernet with the cut channels
zeroed, the outputs that evaluate, export, bench, profile and compare read, and one-line errors;
the inherited weights fine-tuned (``--prune inherited``) and their column in compare's search table."""
import copy
import json

import pytest
import torch
from torch.testing import assert_close

from dsnet.cli import main as dsnet_main
from dsnet.config import load_config
from dsnet.errors import UserError
from dsnet.models.madds import measured_cost
from dsnet.prune import baselines
from dsnet.prune.arch import Architecture, arch_cost, build_plain, full_architecture, load_architecture, named_spaces
from dsnet.prune.baselines import train_static
from dsnet.prune.search import (Scorer, ScoringSet, check_target, greedy_search, narrower, reset_bn,
                                slimmest_architecture, space_choices)
from dsnet.prune.static import load_static
from dsnet.report.compare import collect, compare_rows, search_rows, study_rows
from dsnet.train.checkpoint import build_model, read_checkpoint, save_checkpoint
from dsnet.train.evaluate import evaluate_plain
from dsnet.train.runs import open_stage
from dsnet.train.stage_one import train_supernet
from tests.test_baselines import small_resnet
from tests.test_runs import TINY

SIZE = (3, 8, 8)
CPU = torch.device("cpu")
PLANTED = "units.2.body.0"  # a stage-1 block's inner conv: 8 channels, choices (4, 8)


def _images(gen, n):
    """Noise around a per-image colour: pooled features differ from image to image."""
    return torch.randn(n, *SIZE, generator=gen) * 0.5 + torch.randn(n, 3, 1, 1, generator=gen)


def _supernet(planted: bool):
    """The small ResNet supernet with random weights; ``planted``: the channels of ``PLANTED``
    beyond its next choice write exactly zero (conv filters, BN scale and shift zeroed)."""
    gen = torch.Generator().manual_seed(2)
    model = small_resnet()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        if planted:
            for tensor, dim in named_spaces(model)[PLANTED].members:
                if dim == 0 and isinstance(tensor, torch.nn.Parameter):
                    tensor[4:] = 0
    return model, gen


def _scoring(model, gen, n=128) -> ScoringSet:
    """A calibration batch and ``n`` held-back images labelled with the largest architecture's own
    predictions (after recalibration), so that the largest scores 100% and every change can only lose."""
    calib, held = [_images(gen, 32)], _images(gen, n)
    unlabelled = ScoringSet(calib, [(held, torch.zeros(n, dtype=torch.long))])
    _, full = Scorer(model, unlabelled, SIZE, CPU).full(full_architecture(model))
    with torch.no_grad():
        labels = full(held).argmax(1)
    return ScoringSet(calib, [(held[:n // 2], labels[:n // 2]), (held[n // 2:], labels[n // 2:])])


def _largest(model) -> int:
    return arch_cost(model, full_architecture(model), SIZE).madds


@pytest.fixture(scope="module")
def searched():
    """(the planted supernet, its scoring set, the target, a search to 85% of the largest's MAdds)."""
    model, gen = _supernet(planted=True)
    data = _scoring(model, gen)
    target = 0.85 * _largest(model)
    return model, data, target, greedy_search(Scorer(model, data, SIZE, CPU), target)


def test_a_channel_space_planted_useless_is_the_first_the_search_narrows(searched):
    model, data, _, result = searched
    first = result.steps[0]
    assert first["top1"] == 100.0 and first["kept"] == PLANTED
    planted = next(c for c in first["candidates"] if c["space"] == PLANTED)
    assert planted["top1"] == 100.0 and planted["points_per_mmadds"] == 0.0
    assert all(c["top1"] < 100.0 for c in first["candidates"] if c["space"] != PLANTED)
    # the same supernet without the plant: another space goes first
    clean, gen = _supernet(planted=False)
    one = greedy_search(Scorer(clean, _scoring(clean, gen), SIZE, CPU), _largest(clean) - 1)
    assert one.steps[0]["kept"] != PLANTED


def test_each_candidate_scored_from_its_first_unit_scores_as_from_the_input(searched):
    model, data, _, result = searched
    scorer = Scorer(model, data, SIZE, CPU)
    choices = space_choices(model)
    base = full_architecture(model)
    for cand in result.steps[0]["candidates"]:
        if cand["space"] in ("units.0", "units.5.body.0", "units.10.body.0"):  # first units 0, 5 and 10
            score = scorer.full(narrower(base, cand["space"], choices[cand["space"]]))[0]
            assert score.top1 == cand["top1"] and score.madds == cand["madds"]
            assert score.loss == pytest.approx(cand["loss"], rel=1e-5)
    for step, after in zip(result.steps, result.steps[1:]):  # each step's base is the last step's choice
        kept = next(c for c in step["candidates"] if c["space"] == step["kept"])
        assert (kept["top1"], kept["madds"]) == (after["top1"], after["madds"])
        assert kept["loss"] == pytest.approx(after["loss"], rel=1e-5)
        assert after["widths"] == {**step["widths"], step["kept"]: kept["width"]}


def test_the_search_stops_within_one_step_at_or_under_the_target_at_the_cost_flop_counter_counts(searched):
    model, _, target, result = searched
    assert len(result.steps) >= 3
    assert result.steps[-1]["madds"] <= target < result.steps[-2]["madds"]
    assert all(s["madds"] > target for s in result.steps[:-1])
    plain = build_plain(model, result.arch).eval()
    assert measured_cost(plain, SIZE).madds == result.score.madds == result.steps[-1]["madds"]
    assert result.score.madds == arch_cost(model, result.arch, SIZE).madds
    assert result.arch.widths == result.steps[-1]["widths"]


def test_the_plain_model_with_inherited_weights_is_the_supernet_with_the_cut_channels_zeroed(searched, gen):
    model, _, _, result = searched
    assert result.arch.widths != full_architecture(model).widths
    masked = copy.deepcopy(model)
    with torch.no_grad():  # every channel beyond its space's width writes zero (train-mode BN: 0 scale, 0 shift)
        for name, space in named_spaces(masked).items():
            width = result.arch.widths[name]
            for tensor, dim in space.members:
                if dim == 0 and isinstance(tensor, torch.nn.Parameter):
                    tensor[width:] = 0
    x = _images(gen, 16)
    plain = build_plain(model, result.arch).train()
    with torch.no_grad():
        assert_close(plain(x), masked.train()(x), rtol=1e-4, atol=1e-5)


def test_targets_the_supernet_cannot_reach_are_refused_with_the_range():
    model = small_resnet()
    low = arch_cost(model, slimmest_architecture(model), SIZE).madds
    assert low == min(arch_cost(model, full_architecture(model), SIZE).madds, low)
    assert all(w == c[0] for w, c in zip(slimmest_architecture(model).widths.values(), space_choices(model).values()))
    check_target(model, low, SIZE)
    check_target(model, _largest(model) - 1, SIZE)
    span = f"give a target from {low:,} MAdds (every channel space at its slimmest width) up to below " \
           f"{_largest(model):,} (the largest route)"
    for bad in (low - 1, _largest(model)):
        with pytest.raises(UserError) as err:
            check_target(model, bad, SIZE)
        assert str(err.value) == (f"--target-madds {bad:,.0f} is outside what ds_resnet20 can be slimmed to "
                                  f"at 8x8: {span}")


def test_compare_puts_each_searched_architecture_beside_the_nearest_uniform_subnet_and_dynamic_model():
    def row(method, run, subnet, madds, top1, **extra):
        return {"method": method, "run": run, "subnet": subnet, "madds": madds, "params": 10, "top1": top1, **extra}

    rows = [row("supernet", "/r", 0, 8e6, 50.0), row("supernet", "/r", 1, 10e6, 55.0),
            row("supernet", "/r", 2, 14e6, 60.0),
            row("supernet", "/other", 1, 10.1e6, 10.0),  # another supernet's subnet, nearer the target
            row("search", "/r/search-10.2M", "arch", 10.1e6, 57.0, target_madds=10.2e6,
                supernet="/r/checkpoints/last.pth"),
            row("scratch-e-arch", "/r/scratch-e-search-10.2M", "arch", 10.1e6, 58.0,
                architecture_from="/r/search-10.2M/architecture.json"),
            row("scratch-e-arch", "/r/scratch-e-elsewhere", "arch", 10.1e6, 1.0,
                architecture_from="/r/slimming0.4-largest/architecture.json"),
            row("scratch-b", "/r/scratch-b-subnet1", 1, 10e6, 59.0),
            row("scratch-e", "/r/scratch-e-subnet2", 2, 14e6, 1.0),
            row("inherited", "/r/inherited-subnet2", 2, 14e6, 3.0),
            row("inherited", "/r/inherited-elsewhere", "arch", 10.1e6, 2.0,
                architecture_from="/r/slimming0.4-largest/architecture.json"),
            row("inherited", "/r/inherited-search-10.2M", "arch", 10.1e6, 57.5,
                architecture_from="/r/search-10.2M/architecture.json"),
            row("inherited", "/r/inherited-subnet1", 1, 10e6, 56.0),
            row("dynamic", "/r/gate", "dynamic", 12e6, 61.0), row("gate", "/r/gate", "s=+0.50", 10.5e6, 56.0)]
    assert search_rows(rows) == [{
        "run": "/r/search-10.2M", "target_madds": 10.2e6,
        "searched": {"madds": 10.1e6, "params": 10, "inherited": 57.0, "fine_tuned": 57.5, "scratch_e": 58.0,
                     "scratch_b": None},
        "uniform": {"subnet": 1, "madds": 10e6, "inherited": 55.0, "fine_tuned": 56.0, "scratch_e": None,
                    "scratch_b": 59.0},
        "dynamic": {"label": "gate s=+0.50", "madds": 10.5e6, "top1": 56.0}}]


@pytest.fixture(scope="module")
def supernet_run(tmp_path_factory):
    """A tiny stage-one run on synthetic 16x16 images."""
    out = tmp_path_factory.mktemp("search")
    cfg = load_config(None, [*TINY, f"output.dir={out / 'sup'}", "train.epochs=1", "train.max_steps_per_epoch=2",
                             "data.input_size=16"])
    return train_supernet(cfg)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_dsnet_search_writes_what_evaluate_export_bench_profile_and_compare_read(supernet_run, capsys):
    ckpt = str(supernet_run / "checkpoints" / "last.pth")
    supernet = build_model(read_checkpoint(ckpt))
    args = ["search", ckpt, "--target-madds", "2M", "--holdout", "0.3", "--images", "100", "--calib-batches", "1",
            "data.synthetic_train_size=400"]
    assert dsnet_main(args) == 0
    out = capsys.readouterr().out
    folder = supernet_run / "search-2M"
    assert f"-> {folder / 'architecture.json'}" in out
    arch, rebuilt = load_architecture(folder / "architecture.json")
    log = json.loads((folder / "search.json").read_text())
    assert log["holdout_images"] == 100 and log["calib_images"] == 16 and log["images_per_evaluation"] == 116
    assert log["steps"][-1]["madds"] <= 2e6 < log["steps"][-2]["madds"]
    assert log["evaluations"] == sum(len(s["candidates"]) + 1 for s in log["steps"]) + rebuilt.num_subnets
    assert len(log["uniform"]) == rebuilt.num_subnets
    static = read_checkpoint(folder / "checkpoints" / "last.pth", "static")
    assert Architecture.from_dict(static["architecture"]) == arch and static["baseline"]["method"] == "search"
    model, _ = load_static(static)
    expected = build_plain(supernet, arch)
    for key, value in expected.state_dict().items():  # the supernet's leading channels; statistics re-estimated
        if "running" not in key and "num_batches" not in key:
            assert torch.equal(model.state_dict()[key], value), key
    report = json.loads((folder / "eval.json").read_text())
    assert report["static"][0]["madds"] == log["final"]["madds"] == arch_cost(rebuilt, arch, (3, 16, 16)).madds
    assert dsnet_main(["evaluate", str(folder / "checkpoints" / "last.pth")]) == 0
    assert f"{report['static'][0]['top1']:.2f}" in capsys.readouterr().out
    for fmt in ("torchscript", "onnx", "safetensors"):
        assert dsnet_main(["export", str(folder / "checkpoints" / "last.pth"), "--format", fmt, "--onnx-exporter",
                           "torchscript", "-o", str(folder / f"m.{fmt}")]) == 0
    assert dsnet_main(["bench", str(folder / "checkpoints" / "last.pth"), "--batch-sizes", "1", "--repeats", "1"]) == 0
    assert dsnet_main(["profile", str(folder / "checkpoints" / "last.pth")]) == 0
    capsys.readouterr()
    assert dsnet_main(["compare", str(supernet_run)]) == 0
    table = capsys.readouterr().out
    assert "searched architecture (inherited)" in table and "searched (search-2M)" in table
    # the same output again is refused, nothing touched
    stamp = (folder / "search.json").stat().st_mtime_ns
    assert dsnet_main(args) == 2
    assert "search-2M/architecture.json exists; choose another -o" in capsys.readouterr().err
    assert (folder / "search.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("extra,message", [
    (["--target-madds", "0.1M"], "--target-madds 100,000 is outside what ds_resnet20 can be slimmed to at 16x16"),
    (["--target-madds", "90M"], "up to below 2,581,248 (the largest route)"),
    (["--target-madds", "2M", "--images", "20"], "the search would score candidates on 20 held-back training images "
                                                 "(--holdout 0.3, --images 20); it needs at least 100"),
])
def test_dsnet_search_refuses_bad_input_in_one_line_and_writes_nothing(supernet_run, capsys, extra, message):
    out = supernet_run.parent / "refused"
    args = ["search", str(supernet_run / "checkpoints" / "last.pth"), "--holdout", "0.3", "-o", str(out), *extra,
            "data.synthetic_train_size=400"]
    assert dsnet_main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_dsnet_search_refuses_a_static_checkpoint(tmp_path, capsys):
    path = save_checkpoint({"stage": "static", "model_name": "ds_resnet20", "model_kwargs": {}}, tmp_path / "s.pth")
    assert dsnet_main(["search", str(path), "--target-madds", "10M", "-o", str(tmp_path / "out")]) == 2
    assert f"checkpoint {path} is from stage 'static', expected 'supernet' or 'gate'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---- the inherited weights fine-tuned (train-baseline --prune inherited) -------------------------

def _beside(supernet_run, *extra):
    """The supernet run's config for a baseline beside it (``--prune-from`` defaults to its last.pth)."""
    return load_config(None, [*TINY, f"output.dir={supernet_run}", "data.input_size=16", "train.log_interval=1",
                              *extra])


def _start_of(monkeypatch) -> list:
    """Records, for each inherited run, the calibration batches and the weights it starts from."""
    seen = []

    def spy(trained, spec, batches, device, autocast):
        model = real(trained, spec, batches, device, autocast)
        seen.append((batches, copy.deepcopy(model.state_dict())))
        return model

    real = baselines._inherited
    monkeypatch.setattr(baselines, "_inherited", spy)
    return seen


def _reestimated(model, batches):
    """``model`` with its BN statistics zeroed and averaged over ``batches``, in eval mode."""
    reset_bn(model)
    with torch.no_grad():
        model.train()
        for x in batches:
            model(x)
    return model.eval()


def test_an_inherited_run_starts_from_the_supernet_at_its_subnet_with_bn_reestimated_and_finetunes_at_a_constant_lr(
        supernet_run, monkeypatch):
    cfg = _beside(supernet_run)
    seen = _start_of(monkeypatch)
    run = train_static(cfg, 1, prune="inherited", finetune_epochs=2, finetune_lr=0.0123)
    assert run.name == "inherited-subnet1"
    (batches, start), = seen
    assert len(batches) == cfg.train.recalibrate_batches
    ckpt = supernet_run / "checkpoints" / "last.pth"
    supernet = build_model(read_checkpoint(ckpt))
    expected = _reestimated(supernet.extract(supernet.routes.resolve(1)), batches)
    assert start.keys() == expected.state_dict().keys()
    for key, value in expected.state_dict().items():
        assert_close(start[key], value, rtol=0, atol=0, msg=key)
    record = json.loads((run / "eval.json").read_text())["baseline"]
    val = open_stage(cfg).data.val
    assert record["top1_before_finetune"] == evaluate_plain(expected, val, CPU)["top1"]
    assert record["prune_from"] == str(ckpt) and record["method"] == "inherited" and record["subnet"] == 1
    # fine-tuned like every pruned model: finetune_epochs x updates per epoch steps at the constant lr given
    per_epoch = 96 // 16
    state = read_checkpoint(run / "checkpoints" / "last.pth", "static")
    assert state["step"] == state["total_steps"] == record["steps"] == 2 * per_epoch
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in steps if "losses" in r] == [0.0123] * (2 * per_epoch)
    assert not torch.equal(state["model"]["fc.weight"], start["fc.weight"])  # it did train


def test_compare_fills_the_fine_tuned_column_of_the_searched_architecture_and_of_the_uniform_subnet(
        supernet_run, monkeypatch, capsys):
    ckpt = supernet_run / "checkpoints" / "last.pth"
    assert dsnet_main(["search", str(ckpt), "--target-madds", "2.2M", "--holdout", "0.3", "--images", "100",
                       "--calib-batches", "1", "data.synthetic_train_size=400"]) == 0
    folder = supernet_run / "search-2.2M"
    cfg = _beside(supernet_run)
    uniform = search_rows(compare_rows(collect([supernet_run])))[0]["uniform"]["subnet"]
    seen = _start_of(monkeypatch)
    found = train_static(cfg, None, prune="inherited", static_arch=str(folder / "architecture.json"))
    beside = train_static(cfg, uniform, prune="inherited")
    assert found.name == "inherited-search-2.2M" and beside.name == f"inherited-subnet{uniform}"
    arch = load_architecture(folder / "architecture.json")[0]  # the architecture's start: build_plain, re-estimated
    expected = _reestimated(build_plain(build_model(read_checkpoint(ckpt)), arch), seen[0][0])
    for key, value in expected.state_dict().items():
        assert_close(seen[0][1][key], value, rtol=0, atol=0, msg=key)
    assert Architecture.from_dict(read_checkpoint(found / "checkpoints" / "last.pth")["architecture"]) == arch
    top1 = {run: json.loads((run / "eval.json").read_text())["static"][0]["top1"] for run in (found, beside)}
    assert dsnet_main(["compare", str(supernet_run), "--json", str(supernet_run.parent / "c.json")]) == 0
    table = capsys.readouterr().out
    entry = next(s for s in json.loads((supernet_run.parent / "c.json").read_text())["search"]
                 if s["run"] == str(folder))
    assert entry["searched"]["fine_tuned"] == top1[found] and entry["uniform"]["fine_tuned"] == top1[beside]
    assert "fine-tuned" in table and "inherited from the supernet + fine-tuned" in table
    searched = next(line for line in table.splitlines() if line.startswith("searched (search-2.2M)"))
    assert f"{top1[found]:.2f}" in searched.split()[4]


def test_the_study_puts_each_inherited_run_beside_the_scratch_runs_of_its_subnet_or_architecture_file():
    def row(method, run, subnet, top1, **extra):
        return {"method": method, "run": run, "subnet": subnet, "madds": 1e6, "params": 10, "top1": top1, **extra}

    searched = {"architecture_from": "/r/search-2M/architecture.json"}
    rows = [row("inherited", "/r/inherited-subnet1", 1, 56.0), row("scratch-e", "/r/scratch-e-subnet1", 1, 58.0),
            row("scratch-b", "/r/scratch-b-subnet2", 2, 1.0),  # another subnet
            row("inherited", "/r/inherited-search-2M", "arch", 57.0, **searched),
            row("scratch-b-arch", "/r/scratch-b-search-2M", "arch", 59.0, **searched),
            row("scratch-e-arch", "/r/scratch-e-other", "arch", 1.0,
                architecture_from="/r/slimming0.4-largest/architecture.json")]  # another architecture
    study = {s["run"]: (s["fine_tuned"], s["scratch_e"], s["scratch_b"]) for s in study_rows(rows)}
    assert study == {"/r/inherited-subnet1": (56.0, 58.0, None), "/r/inherited-search-2M": (57.0, None, 59.0)}


def _static_checkpoint(tmp_path):
    return save_checkpoint({"stage": "static", "model_name": "ds_resnet20", "model_kwargs": {}}, tmp_path / "s.pth")


@pytest.mark.parametrize("extra,message", [
    (["--static-subnet", "1", "--prune-from", "{static}"],
     "--prune-from {static} is a 'static' checkpoint of ds_resnet20({{}}); --prune inherited starts from a stage-one "
     "or stage-two ('supernet' or 'gate') checkpoint of ds_resnet20("),
    (["--static-subnet", "1", "--prune-from", "{supernet}"],
     "--prune-from {supernet} is a 'supernet' checkpoint of ds_resnet20({{'num_classes': 4, "),
    (["--static-subnet", "1"], "--prune inherited fine-tunes the supernet trained in {out}, but "
                               "{out}/checkpoints/last.pth does not exist: train it first or give its checkpoint "
                               "with --prune-from"),
])
def test_prune_inherited_refuses_a_checkpoint_that_is_not_the_configs_supernet_in_one_line(
        supernet_run, tmp_path, capsys, extra, message):
    paths = {"static": _static_checkpoint(tmp_path), "supernet": supernet_run / "checkpoints" / "last.pth",
             "out": tmp_path / "x"}  # the supernet run is a ds_resnet20 of other widths than quickstart's
    args = ["train-baseline", "-c", "configs/quickstart.yml", f"output.dir={tmp_path / 'x'}", "--prune", "inherited"]
    assert dsnet_main([*args, *(a.format(**paths) for a in extra)]) == 2
    err = capsys.readouterr().err
    assert message.format(**paths) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_prune_inherited_needs_a_subnet_or_an_architecture(tmp_path, capsys):
    args = ["-c", "configs/quickstart.yml", f"output.dir={tmp_path / 'x'}", "--prune", "inherited"]
    with pytest.raises(SystemExit) as exit_:
        dsnet_main(["train-baseline", *args])
    assert exit_.value.code == 2
    assert "one of the arguments --static-subnet --static-arch is required" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        dsnet_main(["train-supernet", *args])
    assert exit_.value.code == 2
    assert "--prune needs --static-subnet I or --static-arch FILE" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
