"""Subnet extraction: a route or the gated model of a supernet as plain torch.nn.

``extract_subnet(model, i)`` is static subnet ``i`` as a plain model; ``extract_dynamic(model)`` is
the gated model as one: ``pre`` (the units before the gate, at the routing space's shared base
route), ``gate`` (attention and width head) and one dense ``posts[r]`` per route of the routing
space. Both hold torch.nn layers (and the dense twins of ``dsnet.models.blocks``) only, and both
script with ``torch.jit.script``; the saved files load with ``torch.jit.load`` where dsnet is not
installed (``dsnet.deploy.export`` writes them).
"""
from __future__ import annotations

import copy
from typing import List, Sequence, Tuple

import torch
from torch import Tensor, nn

from dsnet.layers import DenseGate
from dsnet.layers.heads import head_output
from dsnet.models.net import DenseNet, DSNet
from dsnet.models.policy import confidence
from dsnet.models.routes import fixed_route as _route

__all__ = ["extract_subnet", "extract_dynamic", "DynamicNet"]


def extract_subnet(model: DSNet, subnet: int | str | Sequence[int] | None = None) -> nn.Module:
    """A dense copy of ``subnet`` (index, "largest" or route) built from torch.nn layers only.

    It holds the sliced weights and that width's BN statistics, so in eval mode it returns what
    ``model(x, subnet=subnet)`` returns. The copy shares no storage with the supernet.
    """
    return model.extract(_route(model, subnet))


class DynamicNet(nn.Module):
    """The gated model as a plain, scriptable module (inference only; built by ``extract_dynamic``).

    ``forward(x)``: ``pre`` -> ``gate`` -> argmax -> samples grouped by route -> ``posts[r]`` per
    non-empty group -> logits in input order. ``subnets[r]`` is route r's static subnet index.
    """

    def __init__(self, pre: nn.Sequential, gate: DenseGate, posts: Sequence[DenseNet],
                 subnets: Sequence[int], num_classes: int, cascade_threshold: float = -1.0,
                 cascade_margin: bool = True) -> None:
        super().__init__()
        self.pre, self.gate, self.posts = pre, gate, nn.ModuleList(posts)
        self.subnets: List[int] = [int(i) for i in subnets]
        self.num_classes = int(num_classes)
        self.cascade_threshold = float(cascade_threshold)  # >= 0: the confidence cascade, not the gate
        self.cascade_margin = bool(cascade_margin)  # the cascade's confidence: top-two margin, else top probability

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C, H, W] -> logits [B, num_classes], each sample along the route its gate picks."""
        return self.routed(x)[0]

    @torch.jit.export
    def routed(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """x: [B, C, H, W] -> (logits [B, K], route index [B] (long), gate logits [B, R]).

        One host sync per call: the group sizes decide which routes run.
        """
        h, gate_logits = self.gate.forward_gate(self.pre(x))
        if self.cascade_threshold >= 0.0:
            return self.cascade(h, gate_logits)
        choice = gate_logits.argmax(1)
        if h.shape[0] == 1:
            r = int(choice[0])
            logits = h.new_empty((1, self.num_classes))
            for i, post in enumerate(self.posts):
                if i == r:
                    logits = post(h)
            return logits, choice, gate_logits
        order = torch.argsort(choice, stable=True)
        counts: List[int] = torch.bincount(choice, minlength=len(self.subnets)).tolist()
        groups = h.index_select(0, order).split(counts)
        parts: List[Tensor] = []
        for i, post in enumerate(self.posts):
            if counts[i] > 0:
                parts.append(post(groups[i]))
        sorted_logits = torch.cat(parts)
        logits = torch.empty_like(sorted_logits).index_copy_(0, order, sorted_logits)
        return logits, choice, gate_logits

    def cascade(self, h: Tensor, gate_logits: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """The confidence cascade on gate features h: the slimmest route for every sample, the
        widest too where the slimmest's confidence (``dsnet.models.policy.confidence``) is under the
        threshold."""
        last = len(self.subnets) - 1
        logits = h.new_empty((h.shape[0], self.num_classes))
        for i, slimmest in enumerate(self.posts):
            if i == 0:
                logits = slimmest(h)
        escalate = confidence(logits, self.cascade_margin) < self.cascade_threshold
        index = escalate.nonzero().squeeze(1)
        if index.numel() > 0:
            for j, widest in enumerate(self.posts):
                if j == last:
                    logits = logits.index_copy(0, index, widest(h.index_select(0, index)))
        return logits, escalate.long() * last, gate_logits


def extract_dynamic(model: DSNet) -> DynamicNet:
    """The dynamic model as plain torch.nn, in eval mode: ``DynamicNet(x)`` equals
    ``model(x, subnet="dynamic")`` with ``model`` in eval mode, under its deployment policy (the
    policy's logit bias is folded into the width head's last bias; the cascade keeps its
    threshold). Shares no storage with ``model``."""
    routes, g = model.routes.dynamic_routes, model.gate_index
    dense = [model.extract(route) for route in routes]
    attention = dense[0].features[g]  # the gate's dense twin at the width it sees
    head = copy.deepcopy(model.gate.width_head)
    if model.policy.bias:
        last = head_output(head)
        with torch.no_grad():
            last.bias += torch.tensor(model.policy.bias, dtype=last.bias.dtype, device=last.bias.device)
    gate = DenseGate(attention.reduce, attention.expand, head)
    posts = [DenseNet(d.features[g + 1:], d.fc, model.drop_rate) for d in dense]
    threshold = model.policy.threshold if model.policy.kind == "cascade" else -1.0
    net = DynamicNet(dense[0].features[:g], gate, posts, model.routing_space, model.num_classes, threshold,
                     model.policy.measure == "margin")
    return net.requires_grad_(False).eval()
