"""Architectures found by pruning as baselines: Network Slimming and SSS through ``train_static``
and the CLI (penalty training, the found architecture, fine-tuning, Scratch-E/B of it)."""
import json

import pytest
import torch

import dsnet
from dsnet.prune.arch import Architecture, arch_cost, build_plain, full_architecture, removable_blocks
from dsnet.prune.static import load_static
from dsnet.prune.baselines import train_static
from dsnet.prune.budgets import budget_steps
from dsnet.train.checkpoint import read_checkpoint
from dsnet.cli import main as dsnet_main, train_supernet_main
from dsnet.prune.slimming import slimming_prune
from tests.test_baselines import SIZE, small_resnet, tiny

PER_EPOCH = 96 // 16  # tiny(): 96 training images, batches of 16


def last(run):
    return read_checkpoint(run / "checkpoints" / "last.pth", "static")


def shape(arch: Architecture) -> tuple:
    return arch.model, arch.widths, arch.removed


def bn_scale_sum(state: dict) -> float:
    """Sum of |gamma| over the batch norms of a plain model's state (1-D weights; the classifier's is 2-D)."""
    return sum(float(v.abs().sum()) for k, v in state["model"].items() if k.endswith(".weight") and v.dim() == 1)


def test_slimming_trains_under_its_penalty_then_keeps_the_architecture_of_the_global_threshold(tmp_path):
    cfg = tiny(tmp_path)
    run = train_static(cfg, "largest", prune="slimming", ratio=0.4, slimming_sparsity=0.5)
    assert run.name == "slimming0.4-s0.5-largest"
    trained = last(tmp_path / "slimming-train0.5-largest")
    assert trained["baseline"]["method"] == "slimming-train" and trained["baseline"]["penalty"] == 0.5
    # the penalty was applied: the same run without it (same seed and batches) keeps larger scales
    plain = last(train_static(cfg, "largest", "scratch-e"))
    channels = sum(v.numel() for k, v in plain["model"].items() if k.endswith(".weight") and v.dim() == 1)
    assert bn_scale_sum(trained) < bn_scale_sum(plain) - 0.1 * channels
    # the stored architecture is the one slimming_prune finds in the penalty-trained model
    expected, _ = slimming_prune(small_resnet(), load_static(trained)[0], 0.4)
    state = last(run)
    assert shape(Architecture.from_dict(state["architecture"])) == shape(expected)
    assert Architecture.from_dict(json.loads((run / "architecture.json").read_text())) == \
        Architecture.from_dict(state["architecture"])
    assert {k: v.shape for k, v in state["model"].items()} == \
        {k: v.shape for k, v in build_plain(small_resnet(), expected).state_dict().items()}
    report = json.loads((run / "eval.json").read_text())
    assert report["static"][0]["subnet"] == "arch" and report["baseline"]["ratio"] == 0.4
    assert report["static"][0]["madds"] == arch_cost(small_resnet(), expected, SIZE).madds
    assert "top1_before_finetune" in report["baseline"] and report["baseline"]["steps"] == PER_EPOCH


def test_scratch_runs_of_a_found_architecture_train_it_fresh_on_its_own_budget(tmp_path, capsys):
    cfg = tiny(tmp_path)
    found = train_static(cfg, "largest", prune="slimming", ratio=0.5, slimming_sparsity=0.5)
    arch_file = found / "architecture.json"
    arch = Architecture.from_dict(json.loads(arch_file.read_text()))
    b = train_static(cfg, None, "scratch-b", static_arch=str(arch_file))
    assert b.name == "scratch-b-slimming0.5-s0.5-largest"
    state = last(b)
    madds = arch_cost(small_resnet(), arch, SIZE).madds
    assert state["total_steps"] == state["step"] == budget_steps(small_resnet(), cfg, "arch", "scratch-b", PER_EPOCH,
                                                                 SIZE, madds=madds)[0]
    assert state["total_steps"] == round(PER_EPOCH * dsnet.count_madds(small_resnet(), "largest", SIZE) / madds)
    assert Architecture.from_dict(state["architecture"]) == arch
    fine_tuned = last(found)["model"]
    assert not any(torch.equal(v, fine_tuned[k]) for k, v in state["model"].items() if v.dim() == 4)  # fresh weights
    report = json.loads((b / "eval.json").read_text())
    assert report["baseline"]["method"] == "scratch-b-arch" and report["static"][0]["madds"] == madds
    again = tmp_path / "again.json"  # dsnet evaluate rebuilds the architecture from the checkpoint alone
    assert dsnet_main(["evaluate", str(b / "checkpoints" / "last.pth"), "--json", str(again)]) == 0
    assert json.loads(again.read_text())["static"] == report["static"]
    # dsnet compare sets the fine-tuned model beside its architecture trained from scratch
    assert dsnet_main(["compare", str(tmp_path), "--json", str(tmp_path / "c.json")]) == 0
    study = json.loads((tmp_path / "c.json").read_text())["study"]
    fine = json.loads((found / "eval.json").read_text())["static"][0]
    assert study == [{"method": "slimming", "run": str(found.resolve()), "madds": madds, "params": fine["params"],
                      "fine_tuned": fine["top1"], "scratch_e": None, "scratch_b": report["static"][0]["top1"]}]
    out = capsys.readouterr().out
    assert "Network Slimming (slimming0.5-s0.5-largest)" in out and "Scratch-B (found architecture)" in out


def test_sss_removes_exactly_the_blocks_whose_factor_reached_zero_and_the_shallower_model_scores_the_same(tmp_path):
    cfg = tiny(tmp_path, "train.epochs=2")
    run = train_static(cfg, "largest", prune="sss", sss_gamma=3.0)
    assert run.name == "sss3-largest"
    trained_dir = tmp_path / "sss-train3-largest"
    trained = last(trained_dir)
    factors = {int(k.split(".")[1]): float(v) for k, v in trained["model"].items() if k.endswith(".scale")}
    assert sorted(factors) == removable_blocks(small_resnet())  # the blocks with an identity shortcut
    zero = sorted(i for i, f in factors.items() if f == 0.0)
    assert zero  # a strong penalty zeroes factors within two epochs
    arch = Architecture.from_dict(last(run)["architecture"])
    assert list(arch.removed) == zero and all(w == full for w, full in zip(arch.widths.values(),
                                                                           _full_widths(arch)))
    before = json.loads((run / "eval.json").read_text())["baseline"]["top1_before_finetune"]
    assert before == json.loads((trained_dir / "eval.json").read_text())["static"][0]["top1"]


def _full_widths(arch: Architecture) -> list[int]:
    return list(full_architecture(small_resnet(), arch.removed).widths.values())


@pytest.mark.parametrize("extra,message", [
    (["--static-subnet", "largest", "--prune", "slimming"], "--prune slimming needs --ratio R"),
    (["--static-subnet", "largest", "--prune", "slimming", "--ratio", "1.2"], "in (0, 1) (Liu et al. use 0.4-0.7"),
    (["--static-subnet", "1", "--prune", "sss"], "--prune sss finds its own architecture from the largest route"),
    (["--static-subnet", "1", "--prune", "l1", "--ratio", "0.4"], "--ratio sets the fraction of channels"),
    (["--static-subnet", "largest", "--prune", "slimming", "--ratio", "0.4", "--sss-gamma", "0.1"],
     "--sss-gamma sets the penalty of --prune sss"),
    (["--static-subnet", "largest", "--prune", "sss", "--sss-gamma", "0"], "--sss-gamma must be a positive penalty"),
    (["--static-subnet", "largest", "--prune", "sss", "--sparsity", "0.5"], "--sparsity goes with --prune weight"),
    (["--static-arch", "missing.json"], "--static-arch missing.json does not exist"),
    (["--static-arch", "configs/quickstart.yml"], "--static-arch configs/quickstart.yml is not JSON"),
])
def test_found_architecture_option_errors_are_one_line_and_create_nothing(tmp_path, capsys, extra, message):
    assert train_supernet_main(["-c", "configs/quickstart.yml", f"output.dir={tmp_path / 'x'}", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_static_arch_and_static_subnet_are_one_or_the_other(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_supernet_main(["-c", "configs/quickstart.yml", f"output.dir={tmp_path / 'x'}", "--static-arch", "a.json",
                             "--static-subnet", "1"])
    assert "argument --static-subnet: not allowed with argument --static-arch" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_an_architecture_of_another_model_and_a_prune_source_without_the_penalty_are_refused(tmp_path):
    cfg = tiny(tmp_path)
    other = full_architecture(small_resnet())
    other = Architecture("ds_mobilenet_v1", {}, other.widths)
    path = tmp_path / "other.json"
    path.write_text(json.dumps(other.to_dict()))
    with pytest.raises(ValueError, match="is not a dsnet architecture|is an architecture of ds_mobilenet_v1|"
                                         "does not fit|has the channel spaces"):
        train_static(cfg, None, "scratch-e", static_arch=str(path))
    plain = train_static(cfg, "largest", "scratch-e")
    with pytest.raises(ValueError, match="was not trained with slimming's penalty .* starts from a "
                                         "slimming-train0.0001-largest run"):
        train_static(cfg, "largest", prune="slimming", ratio=0.4, prune_from=str(plain / "checkpoints" / "last.pth"))
    assert not (tmp_path / "slimming0.4-largest").exists()


def test_the_study_matches_each_pruned_model_with_scratch_runs_of_its_architecture_and_budget_only():
    from dsnet.report.compare import study_rows

    def row(method, run, subnet, top1, **extra):
        return {"method": method, "run": run, "subnet": subnet, "madds": 1e6, "params": 10, "top1": top1, **extra}

    rows = [row("l1", "/r/l1-subnet0", 0, 40.0), row("scratch-e", "/r/scratch-e-subnet0", 0, 50.0),
            row("scratch-b-supernet", "/r/scratch-b-supernet-subnet0", 0, 70.0),  # another budget
            row("scratch-b", "/r/scratch-b-subnet1", 1, 60.0),  # another architecture
            row("sss", "/r/sss0.01-largest", "arch", 45.0),
            row("scratch-b-arch", "/r/scratch-b-sss0.01-largest", "arch", 55.0,
                architecture_from="/r/sss0.01-largest/architecture.json")]
    study = {s["method"]: (s["fine_tuned"], s["scratch_e"], s["scratch_b"]) for s in study_rows(rows)}
    assert study == {"l1": (40.0, 50.0, None), "sss": (45.0, None, 55.0)}
