"""Static baselines (Liu et al. 2019): budget arithmetic, L1 pruning, short runs, dsnet compare."""
import json

import pytest
import timm
import torch

import dsnet
from dsnet.prune.baselines import train_static
from dsnet.prune.budgets import budget_steps, finetune_epochs_default, sandwich_madds
from dsnet.train.checkpoint import read_checkpoint
from dsnet.cli import main as dsnet_main, train_supernet_main
from dsnet.report.compare import collect, compare_rows
from dsnet.config import load_config, replace
from dsnet.prune.channels import channel_spaces, implant, l1_prune
from dsnet.train.stage_two import train_gate
from dsnet.train.stage_one import train_supernet
from tests.conftest import randomize_bn_
from tests.test_runs import TINY, assert_same_weights, interrupt_after_first_epoch

SIZE = (3, 32, 32)


def small_resnet():
    return timm.create_model("ds_resnet20", num_classes=4, base_mults=(0.25, 0.5),
                             width_mults=(0.125, 0.25, 0.5)).eval()


# ---- budget arithmetic -------------------------------------------------------------------------

@pytest.mark.parametrize("teacher,num_random", [("ensemble", 2), ("ema", 1), ("inplace", 2), ("none", 0)])
def test_sandwich_madds_counts_three_passes_per_trained_route_and_one_per_teacher_forward(teacher, num_random):
    m = small_resnet()
    s = [dsnet.count_madds(m, i, SIZE) for i in range(m.num_subnets)]
    big = dsnet.count_madds(m, "largest", SIZE)
    mean_random = (s[1] + s[2]) / 2  # random routes are drawn from subnets 1..N-1
    teacher_fwd = {"ensemble": big + num_random * mean_random, "ema": big}.get(teacher, 0)
    expected = 3 * (big + num_random * mean_random + s[0]) + teacher_fwd
    assert sandwich_madds(m, num_random, teacher, SIZE) == pytest.approx(expected, rel=1e-12)


def test_scratch_e_keeps_the_steps_and_scratch_b_supernet_scales_them_by_the_supernets_madds(tmp_path):
    m = small_resnet()
    cfg = load_config(None, ["train.epochs=3", "ieb.num_random=1", "ieb.teacher=ensemble"])
    assert budget_steps(m, cfg, 1, "scratch-e", 7, SIZE) == (21, 1.0)
    steps, ratio = budget_steps(m, cfg, 0, "scratch-b-supernet", 7, SIZE)
    s0 = dsnet.count_madds(m, 0, SIZE)
    assert ratio == pytest.approx(sandwich_madds(m, 1, "ensemble", SIZE) / (3 * s0))
    assert steps == round(21 * ratio) and ratio > 4  # the slimmest gets many more steps
    steps_big, ratio_big = budget_steps(m, cfg, "largest", "scratch-b-supernet", 7, SIZE)
    assert 1 < ratio_big < ratio and steps_big == round(21 * ratio_big)
    with pytest.raises(ValueError, match="--budget must be one of scratch-e, scratch-b, scratch-b-supernet"):
        budget_steps(m, cfg, 0, "scratch-c", 7, SIZE)


@pytest.mark.parametrize("subnet", [0, 2, "largest"])
def test_scratch_b_is_liu_et_als_rule_epochs_times_the_madds_of_the_largest_over_the_subnets(subnet):
    m = small_resnet()
    cfg = load_config(None, ["train.epochs=3"])
    ratio = dsnet.count_madds(m, "largest", SIZE) / dsnet.count_madds(m, subnet, SIZE)
    assert budget_steps(m, cfg, subnet, "scratch-b", 7, SIZE) == (round(3 * 7 * ratio), pytest.approx(ratio))
    # the cap, as Liu et al.'s ImageNet scripts set it (there: twice the epochs)
    capped = budget_steps(m, cfg, subnet, "scratch-b", 7, SIZE, cap_epochs=6)[0]
    assert capped == min(round(3 * 7 * ratio), 6 * 7)
    if subnet == 0:
        assert ratio > 2 and capped == 42  # the slimmest is cut at six epochs


def test_budget_cap_is_refused_for_scratch_e_and_for_non_positive_epochs():
    m = small_resnet()
    cfg = load_config(None, ["train.epochs=3"])
    with pytest.raises(ValueError, match="--budget-cap-epochs takes a positive number of epochs and caps a "
                                         "scratch-b or scratch-b-supernet budget, got 4 with --budget scratch-e"):
        budget_steps(m, cfg, 0, "scratch-e", 7, SIZE, cap_epochs=4)
    with pytest.raises(ValueError, match="got 0 with --budget scratch-b"):
        budget_steps(m, cfg, 0, "scratch-b", 7, SIZE, cap_epochs=0)


@pytest.mark.parametrize("epochs,expected", [(160, 40), (6, 2), (1, 1), (300, 75)])
def test_finetuning_lasts_a_quarter_of_the_training_epochs_by_default(epochs, expected, capsys):
    assert finetune_epochs_default(load_config(None, [f"train.epochs={epochs}"])) == expected
    with pytest.raises(SystemExit):
        train_supernet_main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default train.epochs / 4: Liu et al. fine-tune 40 epochs after 160)" in help_text
    assert "(default train.lr / 100: Liu et al. fine-tune at 0.001 after training at 0.1)" in help_text


# ---- L1 pruning -----------------------------------------------------------------------------

def small_mobilenet():
    from dsnet.models.mobilenet_v1 import build_mobilenet_v1
    from dsnet.models.spec import StageSpec

    stages = (StageSpec(choices=(8, 16), depth=1, stride=2, group=0),
              StageSpec(choices=(16, 24, 32), depth=2, stride=2, group=1, gated=True),
              StageSpec(choices=(32, 40, 48), depth=1, stride=2, group=1))
    return build_mobilenet_v1((8, 16), stages, 5, None).eval()


def trained_large(gen, factory=small_resnet):
    """A supernet with random weights and statistics, and its largest route as a plain model."""
    m = factory()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    randomize_bn_(m, gen)
    return m, dsnet.extract_subnet(m, "largest").eval()


@pytest.mark.parametrize("subnet", [0, 2])
def test_l1_pruning_keeps_the_filters_with_the_largest_l1_norms(gen, subnet):
    _, large = trained_large(gen)
    pruned = l1_prune(implant(small_resnet(), large), subnet)
    stem, block = large.features[0][0].weight, large.features[1].body[0][0].weight
    # the stem writes the first stage's residual stream, as do the second conv of each of its blocks
    writers = [stem] + [large.features[i].body[1][0].weight for i in (1, 2, 3)]
    stream_score = sum(w.abs().sum((1, 2, 3)) for w in writers)
    keep = stream_score.topk(pruned.features[0][0].out_channels).indices.sort().values
    torch.testing.assert_close(pruned.features[0][0].weight, stem[keep], rtol=0, atol=0)
    torch.testing.assert_close(pruned.features[0][1].running_mean, large.features[0][1].running_mean[keep],
                               rtol=0, atol=0)
    # a block's first conv writes a space of its own: ranked by its own filters alone
    inner = block.abs().sum((1, 2, 3)).topk(pruned.features[1].body[0][0].out_channels).indices.sort().values
    torch.testing.assert_close(pruned.features[1].body[0][0].weight, block[inner][:, keep], rtol=0, atol=0)
    assert sum(p.numel() for p in pruned.parameters()) == dsnet.count_params(small_resnet(), subnet)


@pytest.mark.parametrize("factory", [small_resnet, small_mobilenet])
def test_pruned_model_equals_the_original_when_the_dropped_channels_are_dead(gen, factory):
    """Zero every filter (and BN shift) outside a random subset of each channel space: those
    channels carry exact zeros, have the smallest L1 norms, and dropping them changes nothing
    (residual streams; depthwise convs and squeeze-excite inside a space)."""
    model, _ = trained_large(gen, factory)
    subnet = 1
    bns = [m for m in model.modules() if isinstance(m, dsnet.layers.DSBatchNorm2d)]
    with torch.no_grad():
        for space in channel_spaces(model, subnet):
            dead = torch.randperm(space.writers[0].shape[0], generator=gen)[space.width:]
            for w in space.writers:
                w[dead] = 0
            for bn in bns:  # the batch norms of this space: zero shift and mean, so zeros stay zeros
                if any(t is bn.bias for t, _ in space.members):
                    bn.bias[dead] = 0
                    bn.running_mean[:, dead] = 0
    large = dsnet.extract_subnet(model, "largest").eval()
    x = torch.randn(4, *SIZE, generator=gen)
    expected = large(x)
    pruned = l1_prune(implant(factory(), large), subnet).eval()
    shape = {k: v.shape for k, v in dsnet.extract_subnet(factory(), subnet).state_dict().items()}
    assert {k: v.shape for k, v in pruned.state_dict().items()} == shape
    torch.testing.assert_close(pruned(x), expected, rtol=1e-4, atol=1e-5)


def test_implant_then_extract_gives_back_the_plain_model(gen):
    _, large = trained_large(gen)
    again = dsnet.extract_subnet(implant(small_resnet(), large), "largest")
    for (ka, a), (kb, b) in zip(large.state_dict().items(), again.state_dict().items()):
        assert ka == kb and torch.equal(a, b), ka
    with pytest.raises(ValueError, match="does not have the shape of ds_resnet20's largest route"):
        implant(small_resnet(), dsnet.extract_subnet(small_resnet(), 0))


# ---- runs and compare -----------------------------------------------------------------------

def tiny(tmp_path, *extra):
    return load_config(None, [*TINY, f"output.dir={tmp_path}", "train.epochs=1", *extra])


def test_scratch_runs_train_the_budgeted_steps_and_write_a_baseline_eval(tmp_path):
    cfg = tiny(tmp_path)
    run_e = train_static(cfg, 1, "scratch-e")
    run_b = train_static(cfg, 1, "scratch-b")
    assert run_e.name == "scratch-e-subnet1" and run_b.name == "scratch-b-subnet1"
    per_epoch = 96 // 16
    e, b = read_checkpoint(run_e / "checkpoints" / "last.pth", "static"), read_checkpoint(run_b / "checkpoints" / "last.pth")
    assert e["step"] == per_epoch
    model = small_resnet()
    _, ratio = budget_steps(model, cfg, 1, "scratch-b", per_epoch, SIZE)
    assert b["step"] == b["total_steps"] == round(per_epoch * ratio)
    report = json.loads((run_b / "eval.json").read_text())
    assert report["baseline"]["method"] == "scratch-b" and report["static"][0]["subnet"] == 1
    assert report["static"][0]["madds"] == dsnet.count_madds(model, 1, SIZE)
    assert report["static"][0]["params"] == sum(p.numel() for p in dsnet.extract_subnet(model, 1).parameters())
    again = tmp_path / "again.json"  # dsnet evaluate reads a baseline checkpoint and agrees with its run
    assert dsnet_main(["evaluate", str(run_b / "checkpoints" / "last.pth"), "--json", str(again)]) == 0
    assert json.loads(again.read_text())["static"] == report["static"]


def test_l1_pipeline_trains_the_largest_route_first_then_prunes_and_finetunes(tmp_path):
    cfg = tiny(tmp_path)
    run = train_static(cfg, 0, prune="l1", finetune_epochs=1)
    assert (tmp_path / "scratch-e-largest" / "eval.json").exists()
    report = json.loads((run / "eval.json").read_text())
    assert report["baseline"]["method"] == "l1" and "top1_before_finetune" in report["baseline"]
    state = read_checkpoint(run / "checkpoints" / "last.pth", "static")
    shapes = {k: v.shape for k, v in state["model"].items()}
    assert shapes == {k: v.shape for k, v in dsnet.extract_subnet(small_resnet(), 0).state_dict().items()}


def test_an_interrupted_finetuning_resumes_to_the_uninterrupted_weights_and_keeps_its_score_before(tmp_path,
                                                                                                     monkeypatch):
    cfg = tiny(tmp_path / "straight")
    straight = train_static(cfg, 0, prune="l1", finetune_epochs=2)
    large = str(tmp_path / "straight" / "scratch-e-largest" / "checkpoints" / "last.pth")
    broken = replace(cfg, **{"output.dir": str(tmp_path / "broken")})
    with monkeypatch.context() as m:
        interrupt_after_first_epoch(m)
        with pytest.raises(KeyboardInterrupt):
            train_static(broken, 0, prune="l1", finetune_epochs=2, prune_from=large)
    last = tmp_path / "broken" / "l1-subnet0" / "checkpoints" / "last.pth"
    assert read_checkpoint(last)["epoch"] == 1
    resumed = train_static(replace(broken, **{"train.resume": str(last)}), 0, prune="l1", finetune_epochs=2,
                           prune_from=large)
    records = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "train_loss_ce" in r] == [1, 2]  # the resumed run trained epoch 2 only
    assert sum("pruned" in r for r in records) == 1  # and did not score the pruned model again
    a, b = (read_checkpoint(run / "checkpoints" / "last.pth") for run in (straight, resumed))
    assert a["step"] == b["step"] == 2 * (96 // 16)
    assert_same_weights(a["model"], b["model"])
    before = [json.loads((run / "eval.json").read_text())["baseline"]["top1_before_finetune"] for run in (straight, resumed)]
    assert before[0] == before[1]


def test_baseline_command_errors_are_one_line_and_create_nothing(tmp_path, capsys):
    args = ["-c", "configs/quickstart.yml", f"output.dir={tmp_path / 'x'}"]
    assert train_supernet_main([*args, "--static-subnet", "7"]) == 2
    assert "--static-subnet 7 is out of range: ds_resnet20 has 4 static subnets" in capsys.readouterr().err
    assert train_supernet_main([*args, "--static-subnet", "two"]) == 2
    assert "--static-subnet must be a subnet index (0 = slimmest) or 'largest'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_supernet_main([*args, "--prune", "l1"])
    assert "--prune needs --static-subnet I" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_l1_refuses_a_prune_from_checkpoint_that_is_not_the_largest_route(tmp_path):
    cfg = tiny(tmp_path)
    run = train_static(cfg, 0, "scratch-e")
    with pytest.raises(ValueError, match="--prune-from .* holds subnet 0 of ds_resnet20; pruning starts from the largest"):
        train_static(cfg, 0, prune="l1", prune_from=str(run / "checkpoints" / "last.pth"))


def test_compare_gathers_supernet_dynamic_and_baselines_and_refuses_other_data(tmp_path, capsys):
    cfg = tiny(tmp_path)
    sup = train_supernet(cfg)
    train_gate(cfg, sup / "checkpoints" / "last.pth")
    train_static(cfg, 0, "scratch-e")
    rows = compare_rows(collect([tmp_path]))
    methods = [r["method"] for r in rows]
    assert methods.count("supernet") == 4 and methods.count("dynamic") == 1 and methods.count("scratch-e") == 1
    assert dsnet_main(["compare", str(tmp_path), "--json", str(tmp_path / "c.json"), "--curves",
                       str(tmp_path / "curves.png")]) == 0
    assert "Scratch-E" in capsys.readouterr().out
    out = json.loads((tmp_path / "c.json").read_text())
    assert len(out["rows"]) == len(rows)
    report = json.loads((sup / "eval.json").read_text())  # the stage-one run alone has a curve: its last epoch
    (curve,) = out["curves"]
    assert curve["run"] == str(sup) and curve["epoch"] == [1] and (tmp_path / "curves.png").stat().st_size
    assert curve["final"] == {"slimmest": report["static"][0]["top1"], "largest": report["largest"]["top1"]}
    other = tmp_path / "other" / "eval.json"
    other.parent.mkdir()
    report = json.loads((sup / "eval.json").read_text())
    other.write_text(json.dumps({**report, "data": {**report["data"], "seed": 5}}))
    assert dsnet_main(["compare", str(tmp_path)]) == 2
    assert "were evaluated on different data" in capsys.readouterr().err


def test_thinet_and_weight_pruning_finetune_from_one_largest_route_and_compare_shows_sparse_madds(tmp_path, capsys):
    cfg = tiny(tmp_path)
    thinet = train_static(cfg, 0, prune="thinet")  # fine-tunes max(1, round(1 / 4)) = 1 epoch
    weight = train_static(cfg, "largest", prune="weight", sparsity=0.5)
    assert thinet.name == "thinet-subnet0" and weight.name == "weight0.5-largest"
    t = json.loads((thinet / "eval.json").read_text())["baseline"]
    assert t["method"] == "thinet" and t["steps"] == 96 // 16 and t["calib_images"] == 2 * 16
    state = read_checkpoint(weight / "checkpoints" / "last.pth", "static")
    large = read_checkpoint(tmp_path / "scratch-e-largest" / "checkpoints" / "last.pth", "static")
    conv_linear = [k for k, v in state["model"].items() if k.endswith("weight") and v.dim() in (2, 4)]
    pruned = sum(int((state["model"][k] == 0).sum()) for k in conv_linear)
    total = sum(state["model"][k].numel() for k in conv_linear)
    assert pruned == round(0.5 * total)  # fine-tuning brought none back
    moved = [k for k in conv_linear if not torch.equal(state["model"][k], large["model"][k])]
    assert moved  # and it did train the kept ones
    report = json.loads((weight / "eval.json").read_text())
    dense = dsnet.count_madds(small_resnet(), "largest", SIZE)
    assert report["static"][0]["madds"] == dense and report["baseline"]["sparsity"] == 0.5
    assert 0.4 * dense < report["baseline"]["madds_sparse"] < 0.65 * dense
    assert dsnet_main(["compare", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "sparse (M)" in out and "weight-pruned + fine-tuned" in out and "ThiNet + fine-tuned" in out
    row = next(line for line in out.splitlines() if line.startswith("weight-pruned"))
    assert f"{report['baseline']['madds_sparse'] / 1e6:.2f}" in row
    # Liu et al.'s weight-level Scratch-B: the same zeros, fresh weights, the sparse model's budget
    scratch = train_static(cfg, "largest", "scratch-b", sparsity=0.5)
    assert scratch.name == "scratch-b-weight0.5-largest"
    fresh = read_checkpoint(scratch / "checkpoints" / "last.pth", "static")
    assert all(torch.equal(fresh["model"][k] == 0, state["model"][k] == 0) for k in conv_linear)
    assert not any(torch.equal(fresh["model"][k], large["model"][k]) for k in conv_linear)
    b = json.loads((scratch / "eval.json").read_text())["baseline"]
    assert b["madds_sparse"] == report["baseline"]["madds_sparse"] and b["method"] == "scratch-b"
    assert "top1_before_finetune" not in b  # trained from scratch: nothing was fine-tuned
    assert fresh["total_steps"] == round(96 // 16 * dense / b["madds_sparse"])
    assert dsnet_main(["compare", str(tmp_path)]) == 0
    assert "Scratch-B (weight-pruned's zeros)" in capsys.readouterr().out


@pytest.mark.parametrize("extra,message", [
    (["--static-subnet", "0", "--prune", "weight", "--sparsity", "0.5"],
     "--prune weight keeps the largest route's shape and zeroes a fraction of its weights: give "
     "--static-subnet largest and --sparsity S"),
    (["--static-subnet", "largest", "--prune", "regression"], "--prune regression needs --static-subnet I"),
    (["--static-subnet", "0", "--prune", "thinet", "--sparsity", "0.5"], "--sparsity sets the fraction of weights"),
    (["--static-subnet", "0", "--sparsity", "0.5"], "--sparsity keeps the largest route's shape"),
    (["--static-subnet", "0", "--prune", "l1", "--budget-cap-epochs", "3"], "--budget-cap-epochs caps a scratch-b"),
    (["--static-subnet", "0", "--budget-cap-epochs", "3"], "--budget-cap-epochs takes a positive number"),
    (["--static-subnet", "largest", "--prune", "weight", "--sparsity", "1.5"],
     "--sparsity must be a fraction in [0, 1) of the weights to prune, got 1.5"),
])
def test_rethink_option_errors_are_one_line_and_create_nothing(tmp_path, capsys, extra, message):
    assert train_supernet_main(["-c", "configs/quickstart.yml", f"output.dir={tmp_path / 'x'}", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
