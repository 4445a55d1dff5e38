"""Deployment policies: table scoring equals routed inference, the cascade's cost, the choice with
its static fallback, --target-madds, and exported models that route as the policy says."""
import pytest
import timm
import torch
from torch.testing import assert_close
from torch.utils.flop_counter import FlopCounterMode

import dsnet
from dsnet.train.evaluate import evaluate_dynamic
from dsnet.deploy.extract import extract_dynamic
from dsnet.layers.heads import head_output
from dsnet.train.policy_select import Outcomes, cascade_policy, choose_policy, collect_outcomes, gate_policy, policy_at_madds, score, static_policy
from dsnet.models.policy import Policy

SIZE = (3, 32, 32)


def _model(randomize_bn, head="fc"):
    torch.manual_seed(0)
    model = timm.create_model("ds_resnet20", num_classes=4, base_mults=(0.5, 1.0), width_mults=(0.25, 0.5, 1.0),
                              routing_space=(0, 2), **({} if head == "fc" else {"gate_head": head, "gate_hidden": 8}))
    g = torch.Generator().manual_seed(0)
    randomize_bn(model, g, torch.randn(16, *SIZE, generator=g))
    with torch.no_grad():  # a gate that splits the data between its two routes
        x = torch.randn(64, *SIZE, generator=g)
        hidden = model.gate.squeeze(model.forward_units(x, model.routes.dynamic_routes[0], 0, model.gate_index)).flatten(1)
        last = head_output(model.gate.width_head)
        inner = hidden if head == "fc" else torch.relu(model.gate.width_head.fc1(hidden))
        weight = torch.randn(2, inner.shape[1], generator=g)
        last.weight.copy_(weight)
        last.bias.copy_(-(inner.mean(0) @ weight.T))
    return model.eval()


def _loader(n=48, batch=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, *SIZE, generator=g), torch.randint(0, 4, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


@pytest.mark.parametrize("make", [lambda o: gate_policy(o, 0.0), lambda o: gate_policy(o, 1.5),
                                  lambda o: static_policy(1, 2), lambda o: cascade_policy(0.4),
                                  lambda o: cascade_policy(0.6, "max")],
                         ids=["gate", "gate-biased", "static", "cascade", "cascade-max"])
def test_table_score_equals_routed_inference_under_the_policy(randomize_bn, make):
    model, loader = _model(randomize_bn), _loader()
    outcomes = collect_outcomes(model, loader, torch.device("cpu"), SIZE)
    policy = make(outcomes)
    model.set_policy(policy)
    routed = evaluate_dynamic(model, loader, torch.device("cpu"), SIZE)
    scored = score(outcomes, policy)
    assert scored["top1"] == pytest.approx(routed["top1"]) and scored["top5"] == pytest.approx(routed["top5"])
    assert scored["madds_mean"] == pytest.approx(routed["madds_mean"])
    assert scored["routing"] == pytest.approx(routed["routing"])


def test_gate_and_cascade_route_sample_by_sample_as_their_definitions_say(randomize_bn):
    model, (x, _) = _model(randomize_bn), _loader(n=32, batch=32)[0]
    with torch.no_grad():
        gate_logits = model.forward_gate(x)[1]
        slim, wide = model(x, subnet=0), model(x, subnet=2)
    bias = torch.tensor([0.0, -float((gate_logits[:, 1] - gate_logits[:, 0]).median()) + 1e-3])
    model.set_policy(Policy("gate", tuple(bias.tolist())))
    with torch.no_grad():
        out = model.forward_dynamic(x)
    take_wide = (gate_logits + bias).argmax(1) == 1
    assert 0 < take_wide.sum() < 32
    assert_close(out.logits, torch.where(take_wide[:, None], wide, slim))
    probs = torch.softmax(slim, 1).sort(1, descending=True).values
    for measure, sure in (("margin", probs[:, 0] - probs[:, 1]), ("max", probs[:, 0])):
        threshold = float(sure.median())
        model.set_policy(cascade_policy(threshold, measure))
        with torch.no_grad():
            out = model.forward_dynamic(x)
        escalate = sure < threshold
        assert 0 < escalate.sum() < 32
        assert_close(out.logits, torch.where(escalate[:, None], wide, slim))
        assert out.choice.tolist() == (escalate.long() * 1).tolist()
    # the two measures disagree on which images are unsure (else the test could not tell them apart)
    assert not torch.equal(probs[:, 0] < probs[:, 0].median(), (probs[:, 0] - probs[:, 1]) < (probs[:, 0] - probs[:, 1]).median())


def test_an_escalated_image_pays_the_slimmest_route_and_the_widest_after_the_shared_units(randomize_bn):
    model = _model(randomize_bn)
    model.set_policy(cascade_policy(0.5))
    dense = dsnet.extract_subnet(model, 2)
    shared_units = dense.features[:model.gate_index + 1]  # the units before the gate and its attention
    with FlopCounterMode(display=False) as counter:
        shared_units(torch.randn(1, *SIZE))
    head = model.gate.width_head.in_features * model.gate.width_head.out_features
    slim, wide = dsnet.count_madds(model, 0, SIZE), dsnet.count_madds(model, 2, SIZE)
    assert model.shared_cost(SIZE) == pytest.approx(counter.get_total_flops() / 2, rel=0.01)
    assert model.policy_costs(SIZE) == [slim + head, slim + head + wide - model.shared_cost(SIZE)]


def _table(hit1, gate_logits, confidence, costs=(10, 20, 30)):
    hit1 = torch.tensor(hit1, dtype=torch.bool)
    sure = torch.tensor(confidence)
    return Outcomes(hit1, hit1, torch.tensor(gate_logits, dtype=torch.float32), {"margin": sure, "max": sure},
                    (0, 1, 2), list(costs), [c + 1 for c in costs], costs[2] - 4)


def _hard_easy_table(n=400, hard=0.3):
    """Subnet 0 right on the easy 70%, subnet 2 on everything, subnet 1 on half the hard ones."""
    g = torch.Generator().manual_seed(0)
    is_hard = torch.rand(n, generator=g) < hard
    half = torch.rand(n, generator=g) < 0.5
    hit1 = torch.stack([~is_hard, ~is_hard | half, torch.ones(n, dtype=torch.bool)], 1)
    confidence = torch.where(is_hard, 0.3, 0.9) + 0.01 * torch.rand(n, generator=g)
    return hit1, is_hard, confidence


def test_a_gate_that_knows_the_hard_images_ships():
    hit1, is_hard, confidence = _hard_easy_table()
    gate = torch.stack([(~is_hard).float(), torch.zeros(len(is_hard)), is_hard.float()], 1) * 4
    chosen = choose_policy(_table(hit1.tolist(), gate.tolist(), confidence.tolist()))
    assert chosen["policy"].kind in ("gate", "cascade") and "beats the static curve" in chosen["reason"]
    assert score(_table(hit1.tolist(), gate.tolist(), confidence.tolist()), chosen["policy"])["top1"] == 100.0


def test_a_gate_that_routes_against_difficulty_falls_back_to_the_best_static_route_at_its_cost():
    hit1, is_hard, _ = _hard_easy_table()
    gate = torch.stack([is_hard.float(), torch.zeros(len(is_hard)), (~is_hard).float()], 1) * 4  # hard -> slim
    flat = torch.full((len(is_hard),), 0.5)  # a cascade that cannot tell either
    outcomes = _table(hit1.tolist(), gate.tolist(), flat.tolist())
    chosen = choose_policy(outcomes)
    trained = score(outcomes, gate_policy(outcomes, 0.0))
    easy = float((~is_hard).double().mean())
    assert trained["madds_mean"] == pytest.approx((1 - easy) * 11 + easy * 31)  # hard images slim, easy wide
    assert chosen["policy"] == static_policy(1, 3)  # 31 is over the gate's ~25: subnet 1 is the best it affords
    assert "falling back to static subnet 1" in chosen["reason"]
    assert score(outcomes, chosen["policy"])["top1"] == pytest.approx(float(hit1[:, 1].double().mean()) * 100)


def test_the_fallback_reads_the_routing_space_not_the_static_table_order():
    # static subnets 0, 1, 2; the gate routes among subnets 1 and 2 only, and knows nothing
    hit1 = torch.tensor([[True, False, True], [True, True, True], [True, False, False], [True, True, True]] * 25)
    gate = torch.tensor([[0.0, 1.0]]).expand(100, 2)  # the trained gate sends everything to subnet 2 (cost 31)
    outcomes = Outcomes(hit1, hit1, gate, {m: torch.full((100,), 0.5) for m in ("margin", "max")}, (1, 2), [10, 20, 30], [21, 31], 26)
    chosen = choose_policy(outcomes, z=1e6)  # subnet 0 is 100% right but outside the routing space
    assert chosen["policy"] == static_policy(1, 2) and "static subnet 2" in chosen["reason"]
    scored = score(outcomes, chosen["policy"])
    assert scored["routing"] == [0.0, 1.0] and scored["madds_mean"] == 31 and scored["top1"] == 75.0


def test_the_choice_needs_more_than_noise():
    hit1, is_hard, confidence = _hard_easy_table(n=400)
    weak = torch.stack([torch.zeros(len(is_hard)), torch.zeros(len(is_hard)), is_hard.float() * 0.0], 1)
    outcomes = _table(hit1.tolist(), weak.tolist(), torch.full((400,), 0.5).tolist())
    lenient, strict = choose_policy(outcomes, z=0.0), choose_policy(outcomes, z=1e6)
    assert strict["policy"].kind == "static"
    assert all(r["gain"] is None or r["gain"] <= 0 or lenient["policy"].kind != "static" for r in lenient["candidates"])


@pytest.mark.parametrize("kind", ["gate", "cascade"])
def test_target_madds_lands_within_two_percent(randomize_bn, kind):
    model, loader = _model(randomize_bn), _loader(n=96)
    outcomes = collect_outcomes(model, loader, torch.device("cpu"), SIZE)
    low, high = model.policy_costs(SIZE)[0], model.dynamic_costs(SIZE)[-1]
    target = low + 0.4 * (high - low)
    policy = policy_at_madds(outcomes, target, kind)
    model.set_policy(policy)
    assert evaluate_dynamic(model, loader, torch.device("cpu"), SIZE)["madds_mean"] == pytest.approx(target, rel=0.02)
    with pytest.raises(ValueError, match="outside what the"):
        policy_at_madds(outcomes, high * 10, kind)


@pytest.mark.parametrize("head, kind, measure", [("fc", "gate", "margin"), ("mlp", "gate", "margin"),
                                                 ("fc", "cascade", "margin"), ("fc", "cascade", "max")])
def test_exported_dynamic_models_route_with_the_policy(randomize_bn, tmp_path, head, kind, measure):
    from dsnet.deploy.torchscript import save_torchscript
    from dsnet.deploy.onnx_export import DynamicOnnxRunner, save_dynamic_onnx

    model, loader = _model(randomize_bn, head), _loader(n=64)
    outcomes = collect_outcomes(model, loader, torch.device("cpu"), SIZE)
    middle = (model.policy_costs(SIZE)[0] + model.dynamic_costs(SIZE)[-1]) / 2
    model.set_policy(policy_at_madds(outcomes, middle, kind, measure=measure))
    x = torch.cat([b[0] for b in loader])
    with torch.no_grad():
        expected = model.forward_dynamic(x)
    assert 0 < expected.choice.sum() < len(x)  # both routes in use: a policy that was ignored would show
    net = extract_dynamic(model)
    save_torchscript(net, tmp_path / "dyn.pt")
    scripted = torch.jit.load(str(tmp_path / "dyn.pt"))
    with torch.no_grad():
        logits, choice, _ = scripted.routed(x)
    assert choice.tolist() == expected.choice.tolist()
    assert_close(logits, expected.logits, rtol=1e-4, atol=1e-5)
    pytest.importorskip("onnxruntime")
    # the policy lives in the weights and dynamic.json, whatever the exporter: the faster one here
    save_dynamic_onnx(net, x[:2], tmp_path / "onnx", exporter="torchscript")
    assert_close(torch.from_numpy(DynamicOnnxRunner(tmp_path / "onnx")(x.numpy())), expected.logits,
                 rtol=1e-4, atol=1e-4)


def test_policy_survives_the_checkpoint(randomize_bn, tmp_path):
    from dsnet.train.checkpoint import build_model

    model = _model(randomize_bn, "mlp")
    policy = cascade_policy(0.37)
    state = {"model_name": model.model_name, "model_kwargs": model.model_kwargs, "model": model.state_dict(),
             "deploy": {"policy": policy.to_dict()}}
    rebuilt = build_model(state).eval()
    assert rebuilt.policy == policy and type(rebuilt.gate.width_head).__name__ == "MLPHead"
    old = {k: v for k, v in policy.to_dict().items() if k != "measure"}  # a record from before the margin
    assert build_model({**state, "deploy": {"policy": old}}).policy == cascade_policy(0.37, "max")
    x = _loader(n=8, batch=8)[0][0]
    model.set_policy(policy)
    with torch.no_grad():
        assert_close(rebuilt(x, subnet="dynamic"), model(x, subnet="dynamic"))


def _noise_folder(root, classes=4, per_class=(24, 10), size=32, seed=0):
    """An image folder whose labels have nothing to do with the images: no gate can beat the
    static subnets on it."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for split, n in zip(("train", "val"), per_class):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_on_an_image_folder_where_the_gate_cannot_win_the_static_fallback_ships(tmp_path, capsys):
    import json

    from dsnet.train.checkpoint import load_checkpoint
    from dsnet.config import load_config
    from dsnet.train.stage_two import train_gate
    from dsnet.train.stage_one import train_supernet

    data = _noise_folder(tmp_path / "noise", per_class=(24, 25))
    cfg = load_config(None, [
        "model.name=ds_resnet20", "model.kwargs={base_mults: [0.25, 0.5], width_mults: [0.125, 0.25, 0.5]}",
        "data.name=folder", f"data.root={data}", "data.num_workers=0", "train.batch_size=16", "train.epochs=1",
        "train.lr_base_batch=16", "train.progress=false", "train.recalibrate_batches=2", "ieb.num_random=1",
        "gate.epochs=1", "gate.holdout=0.25", f"output.dir={tmp_path / 'run'}"])
    run = train_supernet(cfg)
    gate_run = train_gate(cfg, run / "checkpoints/last.pth")
    report = json.loads((gate_run / "eval.json").read_text())
    selection, dynamic = report["selection"], report["dynamic"]
    assert selection["holdout_samples"] == 24 and "falling back to static subnet" in selection["reason"]
    route = dynamic["policy"]["route"]
    subnet = report["routing_space"][route]
    assert dynamic["routing"][route] == 1.0
    assert dynamic["top1"] == report["static"][subnet]["top1"]  # the shipped model is that subnet, image for image
    model = load_checkpoint(gate_run / "checkpoints/last.pth")
    assert model.policy.kind == "static" and dynamic["madds_mean"] == model.dynamic_costs((3, 32, 32))[route]
    assert "falling back" in (gate_run / "metrics.jsonl").read_text()

    # a budget instead: dsnet evaluate --target-madds writes a new checkpoint, export routes with it
    from dsnet.cli import main as dsnet_main

    ckpt = gate_run / "checkpoints/last.pth"
    before = ckpt.read_bytes()
    costs = model.dynamic_costs((3, 32, 32))
    target = (costs[0] + costs[-1]) / 2
    out, again = tmp_path / "budget.pth", tmp_path / "budget.json"
    assert dsnet_main(["evaluate", str(ckpt), "--target-madds", f"{target / 1e6:.4f}M", "-o", str(out),
                       "--json", str(again)]) == 0
    assert ckpt.read_bytes() == before
    budget = json.loads(again.read_text())["dynamic"]
    assert budget["policy"]["kind"] == "gate" and budget["madds_mean"] == pytest.approx(target, rel=0.02)
    assert dsnet_main(["evaluate", str(ckpt), "--target-madds", "1G", "-o", str(tmp_path / "x.pth")]) == 2
    assert not (tmp_path / "x.pth").exists()
    assert dsnet_main(["export", str(out), "--dynamic", "--format", "torchscript", "-o", str(tmp_path / "b.pt")]) == 0
    shipped = load_checkpoint(out)
    images = torch.stack([torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(16)])
    with torch.no_grad():
        expected = shipped.forward_dynamic(images)
        choice = torch.jit.load(str(tmp_path / "b.pt")).routed(images)[1]
    assert choice.tolist() == expected.choice.tolist()
    # dsnet export --target-madds chooses the same operating point on the same images itself
    direct = tmp_path / "direct.pt"
    capsys.readouterr()
    assert dsnet_main(["export", str(ckpt), "--dynamic", "--target-madds", f"{target / 1e6:.4f}M",
                       "--format", "torchscript", "-o", str(direct)]) == 0
    assert f"; {shipped.policy.describe(shipped.routing_space)})" in capsys.readouterr().out
    with torch.no_grad():
        assert torch.jit.load(str(direct)).routed(images)[1].tolist() == expected.choice.tolist()
    assert dsnet_main(["export", str(ckpt), "--subnet", "0", "--target-madds", "1M", "--format", "torchscript",
                       "-o", str(tmp_path / "no.pt")]) == 2
    assert not (tmp_path / "no.pt").exists()


def test_bench_times_and_prices_the_cascade_it_ships(randomize_bn):
    from dsnet.deploy.bench import bench_batch, dense_limit_fns

    model = _model(randomize_bn)
    x = torch.cat([b[0] for b in _loader(n=32)])
    with torch.no_grad():
        top = torch.softmax(model(x, subnet=0), 1).topk(2, 1).values
        model.set_policy(cascade_policy(float((top[:, 0] - top[:, 1]).median())))
        expected = model.forward_dynamic(x).choice
        fns, choice = dense_limit_fns(model, x)
    assert choice.tolist() == expected.tolist() and set(fns) == {"gate", "route0", "route1"}
    row = bench_batch(model, x, SIZE, repeats=1, subnets=False, warmup=0, min_ms=0.0)
    costs = model.policy_costs(SIZE)
    assert row["dynamic_madds_mean"] == pytest.approx(sum(costs[c] for c in expected.tolist()) / len(x))
    assert row["routing"] == torch.bincount(expected, minlength=2).tolist()


def test_the_chosen_policys_reason_gives_the_measured_z_and_the_threshold():
    """The reason line printed z = 1.0 (gate.fallback_z) where the gain was several standard errors."""
    hit1, is_hard, confidence = _hard_easy_table()
    gate = torch.stack([(~is_hard).float(), torch.zeros(len(is_hard)), is_hard.float()], 1) * 4
    chosen = choose_policy(_table(hit1.tolist(), gate.tolist(), confidence.tolist()), z=1.0)
    gain, se = next((r["gain"], r["se"]) for r in chosen["candidates"] if r["policy"] == chosen["policy"].to_dict())
    assert gain / se > 1.5
    assert chosen["reason"].endswith(f"(standard error {se:.2f}, z = {gain / se:.1f}; it must exceed "
                                     "gate.fallback_z = 1)")
