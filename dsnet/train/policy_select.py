"""How each deployment policy of the dynamic model scores, and how dsnet chooses one that is never
worse than a static subnet (what a policy is: ``dsnet.models.policy``).

``collect_outcomes`` runs every static subnet once per image and keeps the per-image correctness,
the gate's logits and the slimmest route's confidence (both measures); a policy's accuracy and mean MAdds are then
a table lookup (``score``), equal to routed inference with that policy (tests/test_policy.py).

``choose_policy`` compares each candidate with the static subnets' accuracy-MAdds curve on the
same images, sample by sample: the curve at the candidate's mean MAdds mixes the two neighbouring
subnets, and the per-image difference gives the gain and its standard error. Among the candidates
whose gain exceeds z standard errors, the one with the largest gain ships; when there is none,
the best static route at the trained gate's cost does, and the report says so.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from dsnet.config import MEASURES
from dsnet.errors import UserError
from dsnet.models.net import DSNet
from dsnet.models.policy import Policy, confidence
from dsnet.train.metrics import Autocast, device_batches, sharded, topk_hits

__all__ = ["Outcomes", "cost_bias", "collect_outcomes", "loader_outcomes", "gather_outcomes", "score",
           "against_curve", "escalation_cost", "target_kind", "reachable_madds",
           "gate_policy", "static_policy", "cascade_policy", "cascade_thresholds", "candidates", "choose_policy", "policy_at_madds",
           "select_policy", "target_policy"]

_NEVER = -1.0e6  # a logit bias no trained gate logit overcomes: the route is never picked


def cost_bias(costs: Sequence[float], strength: float) -> list[float]:
    """Gate-logit bias of strength ``strength``: ``-strength`` x each route's cost, scaled to [0, 1]
    over the routing space. strength > 0 favours slimmer routes, < 0 wider ones."""
    low, span = min(costs), (max(costs) - min(costs)) or 1.0
    return [-strength * (c - low) / span for c in costs]


def gate_policy(outcomes: "Outcomes", strength: float) -> Policy:
    return Policy("gate", tuple(cost_bias(outcomes.dynamic_costs, strength)), float(strength))


def static_policy(route: int, num_routes: int) -> Policy:
    return Policy("static", tuple(0.0 if r == route else _NEVER for r in range(num_routes)), route=route)


def cascade_policy(threshold: float, measure: str = "margin") -> Policy:
    return Policy("cascade", threshold=float(threshold), measure=measure)


@dataclass
class Outcomes:
    """Per-image results of every static subnet on one evaluation set, enough to score any policy.

    hit1, hit5: [N, S] bool, static subnet s right at top-1 / top-5; gate_logits: [N, R] (as
    trained, no policy bias); confidence: {measure: [N]} the routing space's slimmest route's
    confidence under each of ``MEASURES``; costs in MAdds: ``static_costs`` [S] per fixed route, ``dynamic_costs`` [R]
    with the gate's width head, ``escalation_cost`` what the cascade adds for an escalated image.
    """

    hit1: Tensor
    hit5: Tensor
    gate_logits: Tensor
    confidence: dict[str, Tensor]
    space: tuple[int, ...]
    static_costs: list[int]
    dynamic_costs: list[int]
    escalation_cost: int
    extras: dict = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return self.hit1.shape[0]

    def static_top1(self) -> list[float]:
        return (self.hit1.double().mean(0) * 100).tolist()


@torch.inference_mode()
def collect_outcomes(model: DSNet, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device,
                     input_size: Sequence[int], autocast: Callable = contextlib.nullcontext) -> Outcomes:
    """One pass over ``batches`` of (images, labels): every static subnet's per-image top-1/top-5
    correctness, the gate's logits and the slimmest routing-space route's confidence."""
    model.eval()
    routes = model.routes.static_routes
    slim = model.routing_space[0]
    hit1, hit5, gates, conf = [], [], [], []
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            h, gate_logits = model.forward_gate(x)
            logits = [model.forward_from_gate(h, r).float() for r in routes]
        hits = [topk_hits(out, y) for out in logits]
        hit1.append(torch.stack([t[0] for t in hits], 1))
        hit5.append(torch.stack([t[1] for t in hits], 1))
        gates.append(gate_logits.float())
        conf.append(torch.stack([confidence(logits[slim], m == "margin") for m in MEASURES], 1))
    conf = torch.cat(conf).cpu()
    return Outcomes(torch.cat(hit1).cpu(), torch.cat(hit5).cpu(), torch.cat(gates).cpu(),
                    {m: conf[:, i] for i, m in enumerate(MEASURES)},
                    tuple(model.routing_space), [model.route_cost(r, input_size).madds for r in routes],
                    model.dynamic_costs(input_size), escalation_cost(model, input_size))


def escalation_cost(model: DSNet, input_size: Sequence[int]) -> int:
    """MAdds the confidence cascade adds for an image it escalates: the widest routing-space route
    after the units every route shares."""
    return model.route_cost(model.routes.dynamic_routes[-1], input_size).madds - model.shared_cost(input_size)


def target_kind(deploy: str) -> str:
    """The policy that reaches a target MAdds under ``gate.deploy``: the cascade's threshold for
    ``cascade``, else the gate's cost bias."""
    return "cascade" if deploy == "cascade" else "gate"


def reachable_madds(dynamic_costs: Sequence[int], escalation: int, kind: str) -> tuple[float, float]:
    """(lowest, highest) mean MAdds a ``kind`` policy (``gate``: a cost bias; ``cascade``: a
    threshold) can reach, from the routes' ``dynamic_costs`` and the cascade's ``escalation`` cost."""
    if kind == "cascade":
        return dynamic_costs[0], dynamic_costs[0] + escalation
    if kind == "gate":
        return min(dynamic_costs), max(dynamic_costs)
    raise ValueError(f"--target-madds applies to the gate or the cascade, got {kind!r}")


def loader_outcomes(model: DSNet, loader: Iterable, device: torch.device, input_size: Sequence[int],
                    autocast: Autocast = contextlib.nullcontext, max_batches: int | None = None) -> Outcomes:
    """``collect_outcomes`` over ``loader`` (its first ``max_batches``); when the loader is one
    rank's shard (DDP evaluation), every rank's rows gathered into the whole set's table."""
    outcomes = collect_outcomes(model, device_batches(loader, device, max_batches), device, input_size, autocast)
    return gather_outcomes(outcomes) if sharded(loader) else outcomes


def gather_outcomes(outcomes: Outcomes) -> Outcomes:
    """Every rank's per-image rows in one table (rank order), when each rank evaluated its own
    shard under DDP; every rank gets the whole table."""
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (outcomes.hit1, outcomes.hit5, outcomes.gate_logits, outcomes.confidence))
    hit1, hit5, gates = (torch.cat(column) for column in list(zip(*parts))[:3])
    conf = {m: torch.cat([part[3][m] for part in parts]) for m in outcomes.confidence}
    return Outcomes(hit1, hit5, gates, conf, outcomes.space, outcomes.static_costs, outcomes.dynamic_costs,
                    outcomes.escalation_cost)


def _choices(outcomes: Outcomes, policy: Policy) -> tuple[Tensor, Tensor]:
    """(routing-space index [N] each image ends on, MAdds [N] it pays) under ``policy``."""
    costs = torch.tensor(outcomes.dynamic_costs, dtype=torch.float64)
    if policy.kind == "cascade":
        escalate = outcomes.confidence[policy.measure] < policy.threshold
        return escalate.long() * (len(outcomes.space) - 1), costs[0] + escalate.double() * outcomes.escalation_cost
    scores = outcomes.gate_logits + torch.tensor(policy.bias) if policy.bias else outcomes.gate_logits
    choice = scores.argmax(1)
    return choice, costs[choice]


def score(outcomes: Outcomes, policy: Policy) -> dict:
    """Top-1/top-5 (percent), mean MAdds and routing histogram of ``policy``, plus ``hits`` [N]
    (per-image top-1 correctness, for ``against_curve``)."""
    choice, madds = _choices(outcomes, policy)
    subnets = torch.tensor(outcomes.space)[choice]
    rows = torch.arange(outcomes.num_samples)
    hits = outcomes.hit1[rows, subnets]
    routing = torch.bincount(choice, minlength=len(outcomes.space)).double() / max(outcomes.num_samples, 1)
    return {"policy": policy.to_dict(), "top1": float(hits.double().mean()) * 100,
            "top5": float(outcomes.hit5[rows, subnets].double().mean()) * 100,
            "madds_mean": float(madds.mean()), "routing": routing.tolist(), "hits": hits}


def against_curve(outcomes: Outcomes, scored: dict) -> tuple[float, float] | None:
    """(gain in points over the static curve at the policy's mean MAdds, its standard error), from
    per-image differences with the mix of the two neighbouring static subnets; None outside the
    static subnets' MAdds range."""
    madds = scored["madds_mean"]
    points = sorted(zip(outcomes.static_costs, range(len(outcomes.static_costs))))
    for (m0, s0), (m1, s1) in zip(points, points[1:]):
        if m0 <= madds <= m1:
            w = 0.0 if m1 == m0 else (madds - m0) / (m1 - m0)
            curve = (1 - w) * outcomes.hit1[:, s0].double() + w * outcomes.hit1[:, s1].double()
            diff = scored["hits"].double() - curve
            n = diff.numel()
            se = float(diff.std()) / math.sqrt(n) if n > 1 else math.inf
            return float(diff.mean()) * 100, se * 100
    return None


def cascade_thresholds(outcomes: Outcomes, rates: Sequence[float], measure: str = "margin") -> list[float]:
    """The cascade thresholds (on ``measure``) that escalate each fraction ``rates`` of the images:
    quantiles of their confidences, nudged up so the quantile image itself escalates (an image
    escalates when its confidence is strictly under the threshold)."""
    quantiles = torch.quantile(outcomes.confidence[measure].double(), torch.tensor(list(rates), dtype=torch.float64))
    return [math.nextafter(float(q), math.inf) for q in quantiles]


def candidates(outcomes: Outcomes, strengths: Sequence[float] | None = None,
               escalations: Sequence[float] | None = None, measure: str = "margin") -> list[Policy]:
    """Gate operating points (cost-bias strengths, default 25 in [-3, 3]) and cascade thresholds
    on ``measure`` (those that escalate 5%, 10%, ... 50% of the images)."""
    strengths = [-3 + 0.25 * i for i in range(25)] if strengths is None else strengths
    escalations = [0.05 * i for i in range(1, 11)] if escalations is None else escalations
    return ([gate_policy(outcomes, s) for s in strengths]
            + [cascade_policy(t, measure) for t in cascade_thresholds(outcomes, escalations, measure)])


def choose_policy(outcomes: Outcomes, z: float = 1.0, pool: Sequence[Policy] | None = None,
                  images: str = "held-back") -> dict:
    """The policy to ship, chosen on ``outcomes`` (images the gate did not train on).

    Returns {"policy": Policy, "reason": str, "candidates": [{"policy", "top1", "madds_mean",
    "gain", "se"}]}: of the candidates whose gain exceeds ``z`` standard errors, the one with the
    largest gain; else the static fallback (the most accurate routing-space route that costs no
    more than the trained gate).
    """
    rows, best, shown = [], None, None
    for policy in (candidates(outcomes) if pool is None else pool):
        scored = score(outcomes, policy)
        versus = against_curve(outcomes, scored)
        row = {"policy": policy.to_dict(), "top1": scored["top1"], "madds_mean": scored["madds_mean"],
               "gain": None if versus is None else versus[0], "se": None if versus is None else versus[1]}
        rows.append(row)
        if versus is None:
            continue
        if shown is None or versus[0] > shown[0]:
            shown = versus
        if versus[0] > z * versus[1] and versus[0] > 0 and (best is None or versus[0] > best[1][0]):
            best = (policy, versus)
    n = outcomes.num_samples
    if best is not None:
        gain, se = best[1]
        return {"policy": best[0], "candidates": rows,
                "reason": f"{best[0].kind} beats the static curve on {n} {images} images by {gain:+.2f} "
                          f"points (standard error {se:.2f}, z = {gain / se if se > 0 else float('inf'):.1f}; "
                          f"it must exceed gate.fallback_z = {z:g})"}
    budget = score(outcomes, gate_policy(outcomes, 0.0))["madds_mean"]
    top1 = outcomes.static_top1()
    affordable = [r for r, c in enumerate(outcomes.dynamic_costs) if c <= budget + 1e-9] or [0]
    route = max(affordable, key=lambda r: (top1[outcomes.space[r]], -r))
    shown = "none" if shown is None else f"{shown[0]:+.2f} points (standard error {shown[1]:.2f})"
    return {"policy": static_policy(route, len(outcomes.space)), "candidates": rows,
            "reason": f"no dynamic policy beats the static curve on {n} {images} images (best: {shown}); "
                      f"falling back to static subnet {outcomes.space[route]}, the best route at the gate's cost"}


def policy_at_madds(outcomes: Outcomes, target: float, kind: str = "gate", tolerance: float = 1e-3,
                    measure: str = "margin") -> Policy:
    """The ``kind`` policy (``gate``: a cost-bias strength; ``cascade``: a threshold on
    ``measure``) whose mean MAdds on ``outcomes`` is closest to ``target``. Raises ValueError when
    ``target`` is outside what the policy can reach."""
    low, high = reachable_madds(outcomes.dynamic_costs, outcomes.escalation_cost, kind)
    if kind == "cascade":
        make: Callable[[float], Policy] = lambda t: cascade_policy(t, measure)  # noqa: E731
        lo, hi = 0.0, math.nextafter(1.0, math.inf)  # cost rises with the threshold
    else:
        make = lambda s: gate_policy(outcomes, -s)  # noqa: E731  (cost rises as the strength falls)
        lo, hi = -1e4, 1e4
    if not low <= target <= high:
        raise ValueError(f"target {target / 1e6:.2f} M MAdds is outside what the {kind} can reach "
                         f"({low / 1e6:.2f} M .. {high / 1e6:.2f} M)")
    best = None
    for _ in range(100):
        mid = (lo + hi) / 2
        policy = make(mid)
        cost = score(outcomes, policy)["madds_mean"]
        if best is None or abs(cost - target) < abs(best[1] - target):
            best = (policy, cost)
        if abs(cost - target) <= tolerance * target:
            break
        lo, hi = (mid, hi) if cost < target else (lo, mid)
    return best[0]


def select_policy(outcomes: Outcomes, deploy: str, target_madds: float | None, z: float,
                  images: str = "held-back", measure: str = "margin") -> dict:
    """The deployment record ``{"policy", "reason", "holdout_samples"}`` for ``gate.deploy``:
    ``auto`` (best of gate and cascade, static fallback: ``choose_policy``), ``gate`` or ``cascade``;
    with ``target_madds`` the gate's cost bias (or the cascade's threshold) that costs that much.
    The cascade thresholds its ``measure`` of confidence."""
    n = outcomes.num_samples
    if target_madds is not None:
        kind = target_kind(deploy)
        policy = policy_at_madds(outcomes, target_madds, kind, measure=measure)
        cost = score(outcomes, policy)["madds_mean"]
        return {"policy": policy.to_dict(), "holdout_samples": n,
                "reason": f"{kind} at {cost / 1e6:.3f} M MAdds on {n} {images} images (target {target_madds / 1e6:.3f} M)"}
    if deploy == "gate":
        return {"policy": gate_policy(outcomes, 0.0).to_dict(), "holdout_samples": n,
                "reason": "gate.deploy=gate: the gate ships as trained"}
    pool = [p for p in candidates(outcomes, measure=measure) if deploy == "auto" or p.kind == deploy]
    chosen = choose_policy(outcomes, z, pool, images)
    return {"policy": chosen["policy"].to_dict(), "holdout_samples": n, "reason": chosen["reason"],
            "candidates": chosen["candidates"]}


def target_policy(model: DSNet, loader: Iterable, cfg, runtime, input_size: Sequence[int], autocast: Autocast,
                  target: float, kind: str, max_batches: int | None = None) -> dict:
    """The deployment record (``select_policy``) of the ``kind`` policy whose mean MAdds on
    ``loader`` is ``target``; UserError when no policy of that kind reaches it."""
    outcomes = loader_outcomes(model, loader, runtime.device, input_size, autocast, max_batches)
    try:
        return select_policy(outcomes, kind, target, cfg.gate.fallback_z, images="validation",
                             measure=cfg.gate.cascade_measure)
    except ValueError as err:
        raise UserError(str(err)) from None
