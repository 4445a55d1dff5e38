"""IEB loss math on hand-made tensors: which target each subnet of the sandwich learns from."""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from dsnet.train.ieb import IEBStep, ensemble_probs, sandwich_targets, soft_cross_entropy
from dsnet.models.routes import RouteTable

LARGEST = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
RANDOM = torch.tensor([[0.0, 3.0, 0.0], [1.0, 1.0, 1.0]])


def test_soft_cross_entropy_matches_hard_cross_entropy_on_one_hot():
    logits = torch.randn(4, 5)
    y = torch.tensor([0, 3, 1, 4])
    assert_close(soft_cross_entropy(logits, F.one_hot(y, 5).float()), F.cross_entropy(logits, y))


def test_ensemble_is_mean_of_probabilities():
    p = ensemble_probs([LARGEST, RANDOM])
    assert_close(p, (F.softmax(LARGEST, 1) + F.softmax(RANDOM, 1)) / 2)
    assert_close(p.sum(1), torch.ones(2))


def test_ensemble_teacher_gives_slimmest_the_ensemble_and_randoms_the_largest():
    random_t, slim_t = sandwich_targets("ensemble", LARGEST, [RANDOM])
    assert_close(random_t, F.softmax(LARGEST, 1))
    assert_close(slim_t, ensemble_probs([LARGEST, RANDOM]))
    assert not torch.allclose(slim_t, random_t)


@pytest.mark.parametrize("teacher", ["ema", "inplace"])
def test_single_teacher_modes_give_everyone_the_largest(teacher):
    random_t, slim_t = sandwich_targets(teacher, LARGEST, [RANDOM])
    assert_close(random_t, F.softmax(LARGEST, 1))
    assert_close(slim_t, F.softmax(LARGEST, 1))


def test_no_teacher_means_labels():
    assert sandwich_targets("none", None, []) == (None, None)


def test_unknown_teacher_is_refused_by_name():
    with pytest.raises(ValueError, match="ieb.teacher must be one of"):
        sandwich_targets("bogus", LARGEST, [])


class _Recorder(torch.nn.Module):
    """A fake supernet whose logits depend on the route, recording each call."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, x, subnet=None):
        self.calls.append(tuple(subnet))
        return torch.full((x.shape[0], 3), float(sum(subnet))) + self.w * torch.arange(3.0)


def test_step_runs_the_sandwich_and_backwards_once_per_subnet():
    routes = RouteTable((2, 5), (0, 1))
    model, ema = _Recorder(), _Recorder()
    losses = []
    step = IEBStep(model, routes, ema, "ensemble", 2, torch.nn.CrossEntropyLoss())
    out = step(torch.zeros(2, 1), torch.tensor([0, 1]), torch.Generator().manual_seed(0), losses.append)
    plan = out["routes"]
    assert plan[0] == routes.largest and plan[-1] == routes.static(0) and len(plan) == 4
    assert all(1 <= r[-1] <= 4 and r[0] == 0 for r in plan[1:-1])
    assert model.calls == plan                       # student: every subnet once, in sandwich order
    assert ema.calls == plan[:-1]                    # teacher: largest + random subnets (no slimmest)
    assert len(losses) == 4 and list(out["losses"]) == ["largest", "random0", "random1", "slimmest"]


class _NoSyncRecorder(_Recorder):
    """A fake DDP-wrapped supernet: records whether each backward ran inside ``no_sync``."""

    def __init__(self):
        super().__init__()
        self.syncing, self.synced = True, []

    @contextlib.contextmanager
    def no_sync(self):
        self.syncing = False
        try:
            yield
        finally:
            self.syncing = True


def test_under_ddp_only_the_last_subnet_all_reduces():
    """DDP averages gradients once per step, after the slimmest's backward (not once per subnet)."""
    routes = RouteTable((2, 5), (0, 1))
    model = _NoSyncRecorder()
    step = IEBStep(model, routes, _Recorder(), "ensemble", 2, torch.nn.CrossEntropyLoss())
    step(torch.zeros(2, 1), torch.tensor([0, 1]), torch.Generator().manual_seed(0),
         lambda loss: model.synced.append(model.syncing))
    assert model.synced == [False, False, False, True]


def test_step_sampling_is_reproducible_from_the_generator():
    routes = RouteTable((2, 14), (0, 1, 2, 3))
    step = IEBStep(_Recorder(), routes, _Recorder(), "ensemble", 3, torch.nn.CrossEntropyLoss())
    a = step.plan(torch.Generator().manual_seed(7))
    b = step.plan(torch.Generator().manual_seed(7))
    assert a == b


# ---- the sandwich's wiring on a real supernet: which target each subnet's loss uses ----------

def _smoothed_ce(logits, y, smoothing):
    """Label-smoothed cross-entropy written out: targets (1 - s) one-hot + s / K."""
    k = logits.shape[1]
    target = F.one_hot(y, k).float() * (1 - smoothing) + smoothing / k
    return -(target * F.log_softmax(logits, 1)).sum(1).mean()


def _soft_ce(logits, probs):
    return -(probs * F.log_softmax(logits, 1)).sum(1).mean()


def _expected_losses(teacher, model, ema, plan, x, y):
    """Each sandwich member's loss from plain forwards: largest on smoothed labels; the random
    subnets and the slimmest on their teacher's probabilities (or the labels)."""
    logits = [model(x, subnet=r) for r in plan]
    with torch.no_grad():
        if teacher == "inplace":
            big = F.softmax(model(x, subnet=plan[0]), 1)
        elif teacher != "none":
            big = F.softmax(ema(x, subnet=plan[0]), 1)
        if teacher == "ensemble":
            members = [big] + [F.softmax(ema(x, subnet=r), 1) for r in plan[1:-1]]
            slim = sum(members) / len(members)
        elif teacher != "none":
            slim = big
    out = [_smoothed_ce(logits[0], y, 0.1)]
    for i, z in enumerate(logits[1:], 1):
        if teacher == "none":
            out.append(_smoothed_ce(z, y, 0.1))
        else:
            out.append(_soft_ce(z, slim if i == len(plan) - 1 else big))
    return out


@pytest.mark.parametrize("teacher", ["ensemble", "ema", "inplace", "none"])
def test_each_sandwich_member_learns_from_its_own_target(teacher, randomize_bn):
    import copy

    import timm

    torch.manual_seed(0)
    model = timm.create_model("ds_resnet20", num_classes=4, base_mults=(0.25, 0.5), width_mults=(0.125, 0.25, 0.5))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, 16, 16, generator=g), torch.randint(0, 4, (6,), generator=g)
    ema = copy.deepcopy(model)
    with torch.no_grad():  # a teacher that differs from the live model, as after some training
        for p in ema.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    randomize_bn(ema, g, x)
    model.train()
    step = IEBStep(model, model.routes, ema if teacher in ("ensemble", "ema") else None, teacher, 2,
                   torch.nn.CrossEntropyLoss(label_smoothing=0.1))
    out = step(x, y, torch.Generator().manual_seed(2), lambda loss: loss.backward())
    plan = out["routes"]
    assert plan[1] != plan[2] and plan[0] != plan[1]  # distinct subnets: every target differs
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    expected = _expected_losses(teacher, model, ema, plan, x, y)
    assert_close(torch.stack(list(out["losses"].values())), torch.stack(expected).detach())
    assert_close(out["loss"], sum(expected).detach())
    sum(expected).backward()  # and the gradients: the teachers' probabilities are constants
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    for n in want:
        assert_close(got[n], want[n], msg=n)


@pytest.mark.parametrize("teacher", ["ensemble", "ema"])
def test_an_ema_teacher_without_an_ema_is_refused_by_name(teacher):
    with pytest.raises(ValueError, match=f"ieb.teacher={teacher} needs an EMA model"):
        IEBStep(torch.nn.Linear(2, 2), None, None, teacher, 1, torch.nn.CrossEntropyLoss())
    IEBStep(torch.nn.Linear(2, 2), None, None, "inplace", 1, torch.nn.CrossEntropyLoss())  # keeps none



class _Bf16Recorder(_Recorder):
    """A fake supernet whose logits come out in bf16 with digits bf16 cannot hold, as autocast gives them."""

    def forward(self, x, subnet=None):
        logits = super().forward(x, subnet) + torch.tensor([0.0, 1e-2, 2e-2]) * 37.3
        return logits.to(torch.bfloat16)


@pytest.mark.parametrize("teacher", ["none", "inplace"])
def test_every_loss_is_computed_in_fp32_from_the_autocast_logits(teacher):
    """Under bf16 autocast the logits are bf16; the cross-entropy of the label-trained routes is
    taken in fp32 (bf16's 8-bit mantissa rounds the log-softmax), as the soft targets' already is."""
    routes = RouteTable((2, 5), (0, 1))
    y = torch.tensor([0, 2])
    out = IEBStep(_Bf16Recorder(), routes, None, teacher, 1, torch.nn.CrossEntropyLoss())(
        torch.zeros(2, 1), y, torch.Generator().manual_seed(0), lambda loss: None)
    largest = _Bf16Recorder()(torch.zeros(2, 1), routes.largest)
    assert all(v.dtype == torch.float32 for v in out["losses"].values())
    assert out["losses"]["largest"].item() == F.cross_entropy(largest.float(), y).item()
