"""DSNet: a supernet as a flat list of units, a route table and a classifier head.

``model(x, subnet=...)`` walks the units in an explicit loop with one choice index per unit,
looked up once per route. ``forward_dynamic`` runs the units before the gate once, lets the gate
pick a route per sample, runs each group of samples that share a route on dense slices, and puts
the outputs back in input order.

Inference plans: in eval mode without autograd (``torch.no_grad`` / ``torch.inference_mode``),
a route runs as a list of plain functions built once per route from each unit's
``inference_fn``: F.conv2d / F.batch_norm over cached, detached slices, activations in place, no
module calls: at batch 1 a module call per layer costs more than the layer's arithmetic on
CIFAR-sized layers (docs/results.md measures the difference). Set ``model.inference_plans =
False`` to always take the module path.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module
from torch.utils.hooks import RemovableHandle

from dsnet.heads import width_head
from dsnet.layers import DSLinear, _is_compiling, _version
from dsnet.models.blocks import GateUnit, Unit
from dsnet.policy import Policy, confidence
from dsnet.routes import Route, RouteTable

__all__ = ["DSNet", "DenseNet", "DynamicOutput", "RouteCost", "INITS", "apply_init", "init_weights"]


class DynamicOutput(NamedTuple):
    logits: Tensor       # [B, num_classes]
    choice: Tensor       # [B] long, index into the routing space
    gate_logits: Tensor  # [B, len(routing_space)]


class RouteCost(NamedTuple):
    madds: int
    params: int


class DSNet(nn.Module):
    """A slice-able supernet. Build it through a model family (``dsnet.models``)."""

    def __init__(self, units: Sequence[Unit], num_classes: int, group_sizes: Sequence[int],
                 routing_space: Sequence[int] | None = None, drop_rate: float = 0.0,
                 in_chans: int = 3, default_input_size: tuple[int, int, int] = (3, 224, 224)) -> None:
        super().__init__()
        self.units = nn.ModuleList(units)
        gates = [i for i, u in enumerate(self.units) if isinstance(u, GateUnit)]
        if len(gates) != 1:
            raise ValueError(f"a DSNet needs exactly one GateUnit, found {len(gates)}")
        self.gate_index = gates[0]
        space = tuple(range(group_sizes[-1])) if routing_space is None else tuple(routing_space)
        self.routes = RouteTable(tuple(group_sizes), space)
        if self.gate.width_head.out_features != len(space):
            raise ValueError("the gate's width head must have one logit per route of the routing space")
        self.in_chans, self.num_classes, self.drop_rate = in_chans, num_classes, drop_rate
        self.default_input_size = default_input_size
        self._unit_groups = [u.group for u in self.units]
        self._unit_list = list(self.units)  # plain list: ModuleList indexing costs per call
        self._choice_cache: dict[Route, list[int]] = {}
        self.inference_plans = True
        self._plans: dict[tuple[Route | str, int, int], _Plan] = {}  # (route, start, stop)
        self._hook_scan: tuple[int, bool] | None = None  # (hook handles made by then, any hooks)
        self._cost_cache: dict[tuple, RouteCost] = {}
        self.set_policy(Policy())
        self.num_features = self._trace_width(self.routes.largest)
        self.classifier = DSLinear(self.num_features, num_classes)
        self._init_weights()

    # ---- routes -------------------------------------------------------------------------
    @property
    def gate(self):
        return self.units[self.gate_index].gate

    @property
    def num_subnets(self) -> int:
        return self.routes.num_subnets

    @property
    def routing_space(self) -> tuple[int, ...]:
        return self.routes.routing_space

    def set_routing_space(self, space: Sequence[int]) -> None:
        """Route among static subnets ``space``; a new width head of the same kind if the size
        changes. The deployment policy returns to the plain gate."""
        self.routes = RouteTable(self.routes.group_sizes, tuple(space))
        head = self.gate.width_head
        if head.out_features != len(space):
            self.set_width_head("mlp" if hasattr(head, "hidden") else "fc", getattr(head, "hidden", 64),
                                getattr(head, "dropout", 0.0))
        self.set_policy(Policy())

    def set_width_head(self, kind: str, hidden: int = 64, dropout: float = 0.0) -> None:
        """Replace the gate's width head by a fresh one (``dsnet.heads.width_head``): ``fc`` or
        ``mlp`` with ``hidden`` units; it starts at zero logits."""
        old = self.gate.width_head
        self.gate.width_head = width_head(kind, old.in_features, len(self.routing_space), hidden,
                                          dropout).to(next(old.parameters()).device)

    # ---- deployment policy: what ``subnet="dynamic"`` runs --------------------------------------
    def set_policy(self, policy: Policy) -> None:
        """Make ``policy`` (``dsnet.policy.Policy``) the dynamic model: the gate with a per-route
        logit bias (``gate``; ``static`` is a bias that always picks one route) or the confidence
        cascade. ``dsnet.load_checkpoint`` applies the policy a run chose."""
        policy.check(len(self.routing_space))
        self.policy = policy
        self._bias_cache: dict[tuple, Tensor] = {}

    def _policy_bias(self, like: Tensor) -> Tensor | None:
        bias = self.policy.bias
        if not bias:
            return None
        key = (like.device, like.dtype)
        if key not in self._bias_cache:
            self._bias_cache[key] = torch.tensor(bias, dtype=like.dtype, device=like.device)
        return self._bias_cache[key]

    def _choices(self, route: Route) -> list[int]:
        ks = self._choice_cache.get(route)
        if ks is None:
            ks = [route[g] if g is not None else -1 for g in self._unit_groups]
            self._choice_cache[route] = ks
        return ks

    # ---- forward paths --------------------------------------------------------------------
    def forward(self, x: Tensor, subnet: int | str | Sequence[int] | None = None) -> Tensor:
        """x: [B, C, H, W] -> logits [B, num_classes] along ``subnet`` (index, "largest", "dynamic")."""
        if subnet == "dynamic":
            return self.forward_dynamic(x).logits
        route = self.routes.resolve(subnet)
        if self._planning():
            return self._plan(route, 0, len(self.units))(x)
        return self.forward_head(self.forward_units(x, route, 0, len(self.units)), route)

    # ---- inference plans: a route's layers as plain functions over cached slices -------------
    def _planning(self) -> bool:
        """Whether this call may run an inference plan: eval mode, no autograd, nobody tracing,
        and no forward hooks on submodules (plans make no module calls, so hooks would not fire)."""
        return (self.inference_plans and not self.training and not torch.is_grad_enabled()
                and not torch.jit.is_tracing() and not _is_compiling() and not self._hooked())

    def _hooked(self) -> bool:
        """Whether a submodule or a global module hook watches forward calls. The modules are
        scanned again only when a hook handle was made since the last scan (torch numbers every
        handle) or while hooks were there, so a hook-free model pays one comparison per call.
        A module swapped into the model with hooks already on is seen at the next scan (when
        any hook handle is made); ``dsnet.layers.clear_slice_caches(model)`` forces one."""
        made = getattr(RemovableHandle, "next_id", None)
        scan = getattr(self, "_hook_scan", None)
        if made is None or scan is None or scan[0] != made or scan[1]:
            hooked = bool(_module._global_forward_hooks or _module._global_forward_pre_hooks) or any(
                m._forward_hooks or m._forward_pre_hooks for m in self.modules() if m is not self)
            self._hook_scan = scan = (made, hooked)
        return scan[1]

    def _plan(self, route: Route, start: int, stop: int) -> "_Plan":
        """units[start:stop] along ``route`` (and the head if ``stop`` is the end) as one plan,
        rebuilt when a weight it holds as a copy has changed in place."""
        key = (route, start, stop)
        plan = self._plans.get(key)
        if plan is None or not plan.fresh():
            plan = self._plans[key] = self._build_plan(route, start, stop)
        return plan

    def _build_plan(self, route: Route, start: int, stop: int) -> "_Plan":
        ks, largest, end = self._choices(route), route == self.routes.largest, len(self.units)
        c = self._trace_width_until(route, start)
        steps: list[Callable[[Tensor], Tensor]] = []
        watch: list[Tensor] = []
        for unit, k in zip(self._unit_list[start:stop], ks[start:stop]):
            steps.append(unit.inference_fn(c, k, largest, watch))
            c = unit.out_width(c, k)
        if stop == end:
            steps.append(lambda x: x.mean((2, 3)))  # dropout is off in eval mode
            steps.append(self.classifier.inference_fn(c))
        return _Plan(steps, watch)

    def _apply(self, fn, recurse=True):  # plans hold views of the old tensors
        self._plans.clear()
        return super()._apply(fn, recurse)

    def __getstate__(self):  # a copy (deepcopy, pickle) must not share plans over our tensors
        state = super().__getstate__()
        state["_plans"], state["_hook_scan"], state["_bias_cache"] = {}, None, {}
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._plans.clear()  # assign=True swaps tensors under the plans
        return super().load_state_dict(state_dict, strict, assign)

    def forward_units(self, x: Tensor, route: Route, start: int, stop: int) -> Tensor:
        """Run units[start:stop] along ``route``; x: [B, C, H, W] -> features [B, C', H', W']."""
        ks, largest = self._choices(route), route == self.routes.largest
        units = self._unit_list
        for i in range(start, stop):
            x = units[i](x, ks[i], largest)
        return x

    def forward_head(self, x: Tensor, route: Route) -> Tensor:
        """Features [B, C, H, W] -> logits [B, num_classes]; dropout on the largest route only."""
        x = x.mean((2, 3))
        if self.drop_rate > 0 and self.training and route == self.routes.largest:
            x = F.dropout(x, self.drop_rate, True)
        return self.classifier(x)

    def forward_gate(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Images [B, C, H, W] -> (gate-attended features at the gate, route logits [B, R])."""
        if self._planning():
            return self._gate_plan()(x)
        x = self.forward_units(x, self.routes.dynamic_routes[0], 0, self.gate_index)
        return self.gate.forward_gate(x)

    def gate_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Images [B, C, H, W] -> (gate-attended features at the gate, the gate's hidden features
        [B, hidden], which its width head reads). What stage two trains the width head on."""
        attended, hidden = self.gate.attend(self.forward_units(x, self.routes.dynamic_routes[0], 0, self.gate_index))
        return attended, hidden.flatten(1)

    def _gate_plan(self) -> "_Plan":
        """The units before the gate and both gate heads as one plan, keyed by the width head
        (``set_routing_space`` replaces it) and rebuilt like route plans."""
        head = self.gate.width_head
        key = ("gate", id(head), self.gate_index)
        plan = self._plans.get(key)
        if plan is None or not plan.fresh():
            for old in [k for k in self._plans if k[0] == "gate"]:  # a replaced head's plan
                del self._plans[old]
            route = self.routes.dynamic_routes[0]
            units = self._build_plan(route, 0, self.gate_index)
            gate = self.gate.gate_fn(self._trace_width_until(route, self.gate_index), units.watch)
            plan = self._plans[key] = _Plan([*units.steps, gate], units.watch)
        return plan

    def forward_from_gate(self, h: Tensor, route: Route) -> Tensor:
        """Features after the gate [B, C, H, W] -> logits along ``route``."""
        if self._planning():
            return self._plan(route, self.gate_index + 1, len(self.units))(h)
        return self.forward_head(self.forward_units(h, route, self.gate_index + 1, len(self.units)), route)

    def forward_dynamic(self, x: Tensor, logit_bias: Tensor | None = None) -> DynamicOutput:
        """Each sample takes the route the deployment policy picks: the argmax of the gate's
        logits + the policy's bias + ``logit_bias`` [R], or the confidence cascade.

        Samples sharing a route run together on dense slices; outputs return in input order.
        One host sync per call (the group sizes decide which kernels run).
        """
        if self.policy.kind == "cascade":
            return self.forward_cascade(x, self.policy.threshold, self.policy.measure)
        h, scores = self.forward_gate(x)
        for bias in (self._policy_bias(scores), logit_bias):
            if bias is not None:
                scores = scores + bias
        gate_logits, choice = scores, scores.argmax(1)
        routes = self.routes.dynamic_routes
        if x.shape[0] == 1:
            logits = self.forward_from_gate(h, routes[int(choice)])
            return DynamicOutput(logits, choice, gate_logits)
        order = torch.argsort(choice, stable=True)
        counts = torch.bincount(choice, minlength=len(routes)).tolist()
        parts = [self.forward_from_gate(part, routes[r])
                 for r, part in enumerate(h[order].split(counts)) if counts[r] > 0]
        sorted_logits = torch.cat(parts) if len(parts) > 1 else parts[0]
        logits = torch.empty_like(sorted_logits).index_copy_(0, order, sorted_logits)
        return DynamicOutput(logits, choice, gate_logits)

    def forward_cascade(self, x: Tensor, threshold: float, measure: str = "margin") -> DynamicOutput:
        """The confidence cascade: every sample takes the slimmest route of the routing space;
        those whose confidence (``dsnet.policy.confidence``: the top-two softmax margin, or with
        ``measure="max"`` the top probability) is under ``threshold`` also take the widest, whose
        logits replace the slimmest's. The units up to the gate run once. ``choice`` is 0 or R-1."""
        routes = self.routes.dynamic_routes
        h, gate_logits = self.forward_gate(x)
        logits = self.forward_from_gate(h, routes[0])
        escalate = confidence(logits, measure == "margin") < threshold
        index = escalate.nonzero().squeeze(1)  # the host sync
        if index.numel():
            logits = logits.index_copy(0, index, self.forward_from_gate(h[index], routes[-1]).to(logits.dtype))
        return DynamicOutput(logits, escalate.long() * (len(routes) - 1), gate_logits)

    # ---- cost and extraction --------------------------------------------------------------
    def _trace_width(self, route: Route) -> int:
        return self._trace_width_until(route, len(self.units))

    def _trace_width_until(self, route: Route, stop: int) -> int:
        """The width entering units[stop] along ``route``."""
        c = self.in_chans
        for unit, k in zip(self._unit_list[:stop], self._choices(route)):
            c = unit.out_width(c, k)
        return c

    def route_cost(self, route: Route, input_size: Sequence[int] | None = None) -> RouteCost:
        """Analytic multiply-adds and parameters of one route (gate's width head excluded)."""
        size = tuple(input_size or self.default_input_size)
        key = (route, size)
        if key not in self._cost_cache:
            if len(size) != 3 or size[0] != self.in_chans or min(size) < 1:
                raise ValueError(f"input_size must be (C, H, W) with C = {self.in_chans}, got {list(size)}")
            madds = params = 0
            c, hw = self.in_chans, (size[1], size[2])
            for unit, k in zip(self.units, self._choices(route)):
                m, p, hw = unit.cost(c, k, hw)
                madds, params, c = madds + m, params + p, unit.out_width(c, k)
            madds += c * hw[0] * hw[1] + c * self.num_classes
            params += c * self.num_classes + self.num_classes
            self._cost_cache[key] = RouteCost(madds, params)
        return self._cost_cache[key]

    def dynamic_costs(self, input_size: Sequence[int] | None = None) -> list[int]:
        """Per-route MAdds of the dynamic model (gate width head included), routing-space order."""
        head = self.units[self.gate_index].head_cost()[0]
        return [self.route_cost(r, input_size).madds + head for r in self.routes.dynamic_routes]

    def shared_cost(self, input_size: Sequence[int] | None = None) -> int:
        """MAdds of the units every routing-space route shares: up to and including the gate's
        channel attention (its width head excluded)."""
        size = tuple(input_size or self.default_input_size)
        route, madds, c, hw = self.routes.dynamic_routes[0], 0, self.in_chans, (size[1], size[2])
        for unit, k in zip(self._unit_list[:self.gate_index + 1], self._choices(route)):
            m, _, hw = unit.cost(c, k, hw)
            madds, c = madds + m, unit.out_width(c, k)
        return madds

    def policy_costs(self, input_size: Sequence[int] | None = None) -> list[int]:
        """MAdds a sample pays under the deployment policy, per routing-space index it ends on:
        ``dynamic_costs`` for the gate; for the cascade, the slimmest route (gate included) and,
        for an escalated sample (index R-1), the widest route's units after the shared ones too."""
        costs = self.dynamic_costs(input_size)
        if self.policy.kind != "cascade":
            return costs
        wide = self.route_cost(self.routes.dynamic_routes[-1], input_size).madds
        return [costs[0]] * (len(costs) - 1) + [costs[0] + wide - self.shared_cost(input_size)]

    def extract(self, route: Route, largest_stats: bool = False) -> "DenseNet":
        """A plain torch.nn copy of ``route``: sliced weights and that width's BN statistics
        (with ``largest_stats``, the leading entries of the largest route's statistics: what
        channel pruning of a model trained along the largest route keeps)."""
        c, layers, largest = self.in_chans, [], route == self.routes.largest or largest_stats
        for unit, k in zip(self.units, self._choices(route)):
            layers.append(unit.dense(c, k, largest))
            c = unit.out_width(c, k)
        net = DenseNet(nn.Sequential(*layers), self.classifier.dense(c), self.drop_rate)
        return net.train(self.training)

    def _init_weights(self) -> None:
        init_weights(self, self.classifier)

    # ---- timm conventions -------------------------------------------------------------------
    default_interpolation = "bilinear"  # ds_mobilenet_v1: bicubic, as the DS-Net release trained it

    @property
    def pretrained_cfg(self) -> dict:
        """What ``timm.data.resolve_data_config({}, model=m)`` reads: dsnet's own data settings for
        this model (CIFAR-10 statistics and no crop up to 64 px, ImageNet's and 0.875 above)."""
        from dsnet.data import default_normalization

        size = tuple(self.default_input_size)
        mean, std = default_normalization(size[-1])
        small = (mean, std) == default_normalization(1)
        return {"input_size": size, "num_classes": self.num_classes, "classifier": "classifier",
                "first_conv": "units.0.conv", "interpolation": self.default_interpolation, "mean": mean,
                "std": std, "crop_pct": 1.0 if small else 0.875, "crop_mode": "center"}

    default_cfg = pretrained_cfg

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier for ``num_classes`` classes (dsnet's init), as timm models do. dsnet
        keeps average pooling (``global_pool`` None or "avg"); for features use ``forward_features``."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"dsnet supernets pool by averaging; global_pool must be None or 'avg', got {global_pool!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (for features use forward_features), got {num_classes}")
        old = self.classifier
        self.classifier = DSLinear(self.num_features, num_classes).to(old.weight.device, old.weight.dtype)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)
        self.num_classes = num_classes
        if hasattr(self, "model_kwargs"):
            self.model_kwargs = {**self.model_kwargs, "num_classes": num_classes}
        self._plans.clear()
        self._cost_cache.clear()

    def forward_features(self, x: Tensor, subnet: int | str | Sequence[int] | None = None) -> Tensor:
        """Images [B, C, H, W] -> features before pooling [B, C', H', W'] along ``subnet``
        (default: the largest route), as timm's ``forward_features``."""
        return self.forward_units(x, self.routes.resolve(subnet), 0, len(self.units))


INITS = ("dsnet", "timm")


def apply_init(model: nn.Module, init: str) -> nn.Module:
    """Re-initialise ``model`` by name: ``dsnet`` (``init_weights``, as built) or ``timm`` (timm's
    EfficientNet initialisation, the DS-Net release's: convolutions normal with std
    sqrt(2 / fan_out), fan_out = k x k x out_channels / groups, so a depthwise filter starts about
    sqrt(channels) times larger than under Kaiming's fan_out; linear layers, the classifier and
    the gate's width head included, uniform in +-1/sqrt(out_features); zero biases)."""
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    if init == "timm":
        from timm.models._efficientnet_builder import efficientnet_init_weights

        efficientnet_init_weights(model)
    return model


def init_weights(model: nn.Module, classifier: nn.Linear) -> None:
    """dsnet's initialisation, for supernets and plain models alike: Kaiming-normal convolutions
    (fan-out, ReLU gain) with zero biases, and a small normal classifier."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.normal_(classifier.weight, std=0.01)
    nn.init.zeros_(classifier.bias)


class _Plan:
    """A route's steps as plain functions, and the versions of the weights it holds as copies."""

    def __init__(self, steps: list[Callable], watch: list[Tensor]) -> None:
        self.steps, self.watch = steps, watch
        self.versions = [_version(t) for t in watch]

    def fresh(self) -> bool:
        return [_version(t) for t in self.watch] == self.versions

    def __call__(self, x: Tensor) -> Tensor:
        for step in self.steps:
            x = step(x)
        return x


class DenseNet(nn.Module):
    """A static subnet as a plain model: ``features`` -> global average pool -> dropout -> fc."""

    def __init__(self, features: nn.Sequential, fc: nn.Linear, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.features, self.fc = features, fc
        self.dropout = nn.Dropout(drop_rate)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C, H, W] -> logits [B, num_classes]."""
        return self.fc(self.dropout(self.features(x).mean((2, 3))))
