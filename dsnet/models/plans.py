"""Inference plans: a DSNet route run as a list of plain functions over cached slices.

What: in eval mode without autograd (``torch.no_grad`` / ``torch.inference_mode``) and with no
forward hooks on the model, ``DSNet`` runs a route (or the units before the gate and the gate's
two heads) as a ``Plan``: one closure per unit, built once per route from the route walk
(``DSNet.route_walk``), calling ``F.conv2d`` / ``F.batch_norm`` / ``F.linear`` on the layers'
cached, detached slices (``dsnet.layers.fastpath``) with activations in place. A plan is the module
path's arithmetic bit for bit (tests/test_plans.py).

Why: at batch 1 a module call plus a Parameter argument cost more than the arithmetic of a
CIFAR-sized layer (docs/results.md, "Slicing overhead", measures it). Plans make no module
calls, so while a hook watches any submodule every call takes the module path and the hook
fires (``Plans.usable``). A slice held as a copy goes stale when its weight changes in place: a
plan watches those weights' version counters and is rebuilt when one moves.
"""
from __future__ import annotations

from typing import Callable, Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _torch_module
from torch.utils.hooks import RemovableHandle

from dsnet.layers import DSBatchNorm2d, DSConv2d, DSGate, DSLinear, SqueezeExcite, channel_attention, gate_forward
from dsnet.layers.fastpath import Cache, is_compiling, pointwise_strided, tensor_version
from dsnet.layers.slimmable import bn_slices, conv_slices, linear_slice
from dsnet.models.blocks import ConvBNAct, GateUnit, Residual, SEUnit, Unit
from dsnet.models.routes import Route, RouteTable

__all__ = ["Step", "Plan", "Plans", "PlannedNet", "conv_step", "bn_step", "linear_step", "attention_step",
           "gate_step", "unit_step"]

Step = Callable[[Tensor], Tensor]


class PlannedNet(Protocol):
    """What a plan reads of the network it runs (``dsnet.models.net.DSNet`` has it all); named
    here so that this module, which ``DSNet.forward`` calls, does not import the network."""

    units: nn.ModuleList
    classifier: DSLinear
    routes: RouteTable
    gate: DSGate
    gate_index: int
    inference_plans: bool
    training: bool

    def route_walk(self, route: Route, start: int = 0, stop: int | None = None) -> Iterator[tuple[Unit, int, int]]: ...

    def width_at(self, route: Route, index: int | None = None) -> int: ...

    def modules(self) -> Iterator[nn.Module]: ...


# ---- layers ---------------------------------------------------------------------------------

def conv_step(conv: DSConv2d, in_c: int, k: int = -1, watch: list[Tensor] | None = None) -> Step:
    """``conv(x, k)`` for inputs of width ``in_c`` as a closure over its cached slices. A slice
    held as a copy goes stale when the weight changes in place: its weight is appended to ``watch``."""
    out_c = in_c if conv.depthwise else conv.out_choices[k]
    weight, bias, strided, copied = conv_slices(conv, out_c, in_c)
    if copied and watch is not None:
        watch.append(conv.weight)
    stride, padding, dilation, groups = conv.stride, conv.padding, conv.dilation, out_c if conv.depthwise else 1
    if strided is None:
        return lambda x: F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    def step(x: Tensor) -> Tensor:
        y = pointwise_strided(x, strided, bias) if x.is_contiguous() else None
        return y if y is not None else F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return step


def bn_step(bn: DSBatchNorm2d, c: int, largest: bool = False) -> Step:
    """``bn(x, largest)`` in eval mode at width ``c``, over views of the statistics row and the
    affine slices (they follow in-place updates)."""
    mean, var, weight, bias = bn_slices(bn, c, largest)
    eps = bn.eps
    return lambda x: F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)


def linear_step(linear: DSLinear, in_f: int) -> Step:
    """``linear(x)`` for ``in_f`` input features, over a view of the weight."""
    weight = linear_slice(linear, in_f)
    with torch.inference_mode(False):
        bias = None if linear.bias is None else linear.bias.detach()
    return lambda x: F.linear(x, weight, bias)


def _attention_parts(se: SqueezeExcite, c: int, watch: list[Tensor] | None) -> tuple[Step, Step]:
    """(reduce, expand) of ``se`` at width ``c``: the 1x1 convolutions of ``channel_attention``."""
    return conv_step(se.reduce, c, 0, watch), conv_step(se.expand, se.hidden, se.choices.index(c), watch)


def attention_step(se: SqueezeExcite, c: int, watch: list[Tensor] | None = None) -> Step:
    """``se(x)`` (a squeeze-excite or the gate's channel attention) at width ``c``."""
    reduce, expand = _attention_parts(se, c, watch)
    return lambda x: channel_attention(x, reduce, expand)[0]


def gate_step(gate: DSGate, c: int, watch: list[Tensor] | None = None) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """``gate.forward_gate(x)`` at width ``c``. The width head is read through views, so training
    it in place needs no rebuild; replacing the head module does (``Plans.gate`` keys by the head)."""
    reduce, expand = _attention_parts(gate, c, watch)
    head = gate.width_head
    if isinstance(head, nn.Linear):
        head_w, head_b = head.weight.detach(), head.bias.detach()
        head = lambda h: F.linear(h, head_w, head_b)  # noqa: E731
    return lambda x: gate_forward(x, reduce, expand, head)


# ---- units ----------------------------------------------------------------------------------

def _inplace_act(act: nn.Module) -> Step | None:
    """The activation as an in-place function (None for identity; other modules are called)."""
    if isinstance(act, nn.Identity):
        return None
    return {nn.ReLU: torch.relu_, nn.SiLU: lambda x: F.silu(x, inplace=True)}.get(type(act), act)


def _conv_bn_act_step(unit: ConvBNAct, in_c: int, k: int, largest: bool, watch: list[Tensor]) -> Step:
    conv, bn = conv_step(unit.conv, in_c, k, watch), bn_step(unit.bn, unit.out_width(in_c, k), largest)
    act = _inplace_act(unit.act)
    if act is None:
        return lambda x: bn(conv(x))
    return lambda x: act(bn(conv(x)))


def _residual_step(unit: Residual, in_c: int, k: int, largest: bool, watch: list[Tensor]) -> Step:
    shortcut = _conv_bn_act_step(unit.shortcut, in_c, k, largest, watch) if unit.shortcut is not None else None
    *steps, last = [_conv_bn_act_step(step, c, k, largest, watch) for step, c, _ in unit.body_walk(in_c, k)]

    def block(x: Tensor) -> Tensor:
        s = shortcut(x) if shortcut is not None else x
        for step in steps:
            x = step(x)
        return torch.relu_(last(x) + s)
    return block


def unit_step(unit: Unit, in_c: int, k: int, largest: bool, watch: list[Tensor]) -> Step:
    """``unit(x, k, largest)`` at input width ``in_c`` as a plain function; a unit this module
    does not know (pooling, a user's own) is called as a module. Weights held as copies are
    appended to ``watch``."""
    if isinstance(unit, ConvBNAct):
        return _conv_bn_act_step(unit, in_c, k, largest, watch)
    if isinstance(unit, Residual):
        return _residual_step(unit, in_c, k, largest, watch)
    if isinstance(unit, (SEUnit, GateUnit)):
        return attention_step(unit.se if isinstance(unit, SEUnit) else unit.gate, in_c, watch)
    return lambda x: unit(x, k, largest)


# ---- plans ----------------------------------------------------------------------------------

class Plan:
    """A route's steps as plain functions, and the versions of the weights it holds as copies."""

    def __init__(self, steps: list[Callable], watch: list[Tensor]) -> None:
        self.steps, self.watch = steps, watch
        self.versions = [tensor_version(t) for t in watch]

    def fresh(self) -> bool:
        return [tensor_version(t) for t in self.watch] == self.versions

    def __call__(self, x: Tensor) -> Tensor:
        for step in self.steps:
            x = step(x)
        return x


def build_plan(model: PlannedNet, route: Route, start: int, stop: int) -> Plan:
    """units[start:stop] of ``model`` along ``route`` as a plan, with the pooling and classifier
    when ``stop`` is the end (dropout is off in eval mode)."""
    largest, steps, watch = route == model.routes.largest, [], []
    for unit, c, k in model.route_walk(route, start, stop):
        steps.append(unit_step(unit, c, k, largest, watch))
    if stop == len(model.units):
        steps.append(lambda x: x.mean((2, 3)))
        steps.append(linear_step(model.classifier, model.width_at(route, stop)))
    return Plan(steps, watch)


class Plans(Cache):
    """A DSNet's plans: keyed (route, start, stop) for units along a route, ("gate", id(width
    head), gate index) for the units before the gate and the gate; and the hook check."""

    def __init__(self) -> None:
        self.entries: dict[tuple, Plan] = {}
        self.hook_scan: tuple[int, bool] | None = None  # (hook handles made by then, any hooks)

    def clear(self) -> None:
        """Drop every plan (they hold the old tensors after a move) and look for hooks again."""
        self.entries.clear()
        self.hook_scan = None

    def __getstate__(self) -> dict:  # a copy (deepcopy, pickle) must not share plans over our tensors
        return {"entries": {}, "hook_scan": None}

    def usable(self, model: PlannedNet) -> bool:
        """Whether this call of ``model`` may run a plan: plans on, eval mode, no autograd, nobody
        tracing or compiling, and no forward hooks (plans make no module calls)."""
        return (model.inference_plans and not model.training and not torch.is_grad_enabled()
                and not torch.jit.is_tracing() and not is_compiling() and not self.hooked(model))

    def hooked(self, model: nn.Module) -> bool:
        """Whether a submodule of ``model`` or a global module hook watches forward calls. The
        modules are scanned again only when a hook handle was made since the last scan (torch
        numbers every handle) or while hooks were there, so a hook-free model pays one comparison
        per call. A module swapped in with hooks already on is seen at the next scan (when any
        hook handle is made); ``dsnet.layers.fastpath.clear_slice_caches(model)`` forces one."""
        made, scan = getattr(RemovableHandle, "next_id", None), self.hook_scan
        if made is None or scan is None or scan[0] != made or scan[1]:
            hooked = bool(_torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks) or any(
                m._forward_hooks or m._forward_pre_hooks for m in model.modules() if m is not model)
            self.hook_scan = scan = (made, hooked)
        return scan[1]

    def route(self, model: PlannedNet, route: Route, start: int, stop: int) -> Plan:
        """units[start:stop] along ``route`` (and the head if ``stop`` is the end), rebuilt when
        a weight it holds as a copy has changed in place."""
        key = (route, start, stop)
        plan = self.entries.get(key)
        if plan is None or not plan.fresh():
            plan = self.entries[key] = build_plan(model, route, start, stop)
        return plan

    def gate(self, model: PlannedNet) -> Plan:
        """The units before the gate and both gate heads (``DSNet.forward_gate``), keyed by the
        width head (``set_routing_space`` replaces it) and rebuilt like route plans."""
        head, g = model.gate.width_head, model.gate_index
        key = ("gate", id(head), g)
        plan = self.entries.get(key)
        if plan is None or not plan.fresh():
            for old in [k for k in self.entries if k[0] == "gate"]:  # a replaced head's plan
                del self.entries[old]
            route = model.routes.dynamic_routes[0]
            units = build_plan(model, route, 0, g)
            gate = gate_step(model.gate, model.width_at(route, g), units.watch)
            plan = self.entries[key] = Plan([*units.steps, gate], units.watch)
        return plan
