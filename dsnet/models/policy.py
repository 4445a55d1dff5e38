"""What the dynamic model runs: its deployment policy, as ``model(x, subnet="dynamic")`` applies it.

A policy decides per image which routes of the routing space run:

- ``gate``: the argmax of the gate's route logits plus a per-route bias (``cost_bias`` of
  ``dsnet.train.policy_select`` at a strength t; t = 0 is the gate as trained);
- ``static``: one routing-space route for every image, as a bias that always picks it (the
  fallback when no dynamic policy beats the static subnets);
- ``cascade``: every image runs the slimmest route; an image whose confidence (``confidence``:
  by default the margin between the slimmest route's top two softmax probabilities, or the top
  probability alone) is under a threshold also runs the widest route, whose prediction replaces
  the slimmest's. The units up to the gate run once, so an escalated image pays the widest
  route's remaining units on top of the slimmest route. This is what a user would build without
  a gate. The margin ranks images by doubt better than the top probability does: an image torn
  between two classes has a high top probability and a small margin (docs/results.md measures
  both).

How a policy is chosen and scored is training's business (``dsnet.train.policy_select``); this
module holds only what the supernet's forward and the exported gated model need.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

from dsnet.config import MEASURES

__all__ = ["KINDS", "MEASURES", "POLICY_KEY", "confidence", "Policy", "with_policy"]


KINDS = ("gate", "static", "cascade")
# The state-dict entry that carries a policy beside the weights (``with_policy``): a uint8 tensor of
# the policy's JSON, so it travels in any weights file; ``DSNet.load_state_dict`` applies it.
POLICY_KEY = "deploy_policy"


def confidence(logits: Tensor, margin: bool = True) -> Tensor:
    """logits [B, K] -> [B]: the cascade's confidence, the top softmax probability minus the
    second (``margin``) or the top probability alone. TorchScript compiles it (dsnet.deploy.extract)."""
    probs = torch.softmax(logits.float(), 1)
    if margin:
        top = probs.topk(2, 1).values
        return top[:, 0] - top[:, 1]
    return probs.amax(1)


@dataclass(frozen=True)
class Policy:
    """A deployment policy (see the module docstring). ``bias``: per-route logit bias of ``gate``
    and ``static``; ``route``: the routing-space index of ``static``; ``threshold``: the cascade's
    confidence threshold, on the scale of ``measure`` (``margin`` or ``max``, see ``confidence``);
    ``strength``: the cost-bias strength ``bias`` came from."""

    kind: str = "gate"
    bias: tuple[float, ...] = ()
    strength: float = 0.0
    route: int = 0
    threshold: float = 0.0
    measure: str = "margin"

    def check(self, num_routes: int) -> None:
        """Raise ValueError unless the policy fits a routing space of ``num_routes`` routes."""
        if self.kind not in KINDS:
            raise ValueError(f"policy kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.measure not in MEASURES:
            raise ValueError(f"policy measure must be one of {', '.join(MEASURES)}, got {self.measure!r}")
        if self.bias and len(self.bias) != num_routes:
            raise ValueError(f"a policy bias needs one value per route ({num_routes}), got {len(self.bias)}")
        if not 0 <= self.route < num_routes:
            raise ValueError(f"policy route {self.route} is outside the routing space (0..{num_routes - 1})")

    def to_dict(self) -> dict:
        return {**asdict(self), "bias": list(self.bias)}

    @classmethod
    def from_dict(cls, d: dict) -> "Policy":
        """The policy of ``to_dict``; a record without ``measure`` (dsnet 0.x before the margin)
        thresholds the top probability."""
        return cls(**{"measure": "max", **d, "bias": tuple(d.get("bias", ()))})

    def to_tensor(self) -> Tensor:
        """The policy as a uint8 tensor of its JSON (``POLICY_KEY``'s value)."""
        return torch.tensor(list(json.dumps(self.to_dict()).encode()), dtype=torch.uint8)

    @classmethod
    def from_tensor(cls, t: Tensor) -> "Policy":
        """The policy ``to_tensor`` encoded; ValueError if ``t`` holds none."""
        try:
            return cls.from_dict(json.loads(bytes(t.to(torch.uint8).tolist()).decode()))
        except (ValueError, TypeError, UnicodeDecodeError) as err:
            raise ValueError(f"the '{POLICY_KEY}' entry of these weights is not a dsnet policy ({err})") from None

    def describe(self, space: Sequence[int]) -> str:
        if self.kind == "static":
            return f"static subnet {space[self.route]} (fallback)"
        if self.kind == "cascade":
            what = "top-two margin" if self.measure == "margin" else "top probability"
            return f"cascade: subnet {space[0]}, then subnet {space[-1]} when its {what} < {self.threshold:.3f}"
        return "gate" + (f", cost bias {self.strength:+.3f}" if self.strength else "")


def with_policy(weights: Mapping[str, Tensor], record: dict | None) -> dict[str, Tensor]:
    """A supernet's ``weights`` plus the policy ``record`` (``Policy.to_dict``; None: the plain
    gate) under ``POLICY_KEY``: what a weights file holds so that loading it, by
    ``model.load_state_dict`` alone, routes as the run shipped."""
    policy = Policy.from_dict(record) if record else Policy()
    return {**weights, POLICY_KEY: policy.to_tensor()}
