"""DSNet: a supernet as a flat list of units, a route table and a classifier head.

``model(x, subnet=...)`` walks the units in an explicit loop with one choice index per unit,
looked up once per route. ``forward_dynamic`` runs the units before the gate once, lets the gate
pick a route per sample, runs each group of samples that share a route on dense slices, and puts
the outputs back in input order.

Costs, extraction and inference plans walk a route the same way: ``route_walk`` yields each unit
with its input width and choice index. In eval mode without autograd a route runs as an
inference plan (``dsnet.models.plans``: plain functions over cached slices, no module calls); set
``model.inference_plans = False`` to always take the module path.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsnet.data import default_normalization
from dsnet.layers import DSLinear
from dsnet.layers.heads import width_head
from dsnet.models.blocks import GateUnit, Unit
from dsnet.models.plans import Plans
from dsnet.models.policy import POLICY_KEY, Policy, confidence
from dsnet.models.routes import Route, RouteTable, walk, width_after

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
        self.plans = Plans()  # dsnet.models.plans: routes as plain functions, without autograd
        self._cost_cache: dict[tuple, RouteCost] = {}
        self.set_policy(Policy())
        self.num_features = self.width_at(self.routes.largest)
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
        """Replace the gate's width head by a fresh one (``dsnet.layers.heads.width_head``): ``fc`` or
        ``mlp`` with ``hidden`` units; it starts at zero logits."""
        old = self.gate.width_head
        self.gate.width_head = width_head(kind, old.in_features, len(self.routing_space), hidden,
                                          dropout).to(next(old.parameters()).device)

    # ---- deployment policy: what ``subnet="dynamic"`` runs --------------------------------------
    def set_policy(self, policy: Policy) -> None:
        """Make ``policy`` (``dsnet.models.policy.Policy``) the dynamic model: the gate with a per-route
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
        if self.plans.usable(self):
            return self.plans.route(self, route, 0, len(self.units))(x)
        return self.forward_head(self.forward_units(x, route, 0, len(self.units)), route)

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
        if self.plans.usable(self):
            return self.plans.gate(self)(x)
        return self.gate.forward_gate(self.forward_to_gate(x))

    def forward_to_gate(self, x: Tensor) -> Tensor:
        """Images [B, C, H, W] -> the features the gate reads: the units before it, which every
        route of the routing space shares (run at the first's widths)."""
        return self.forward_units(x, self.routes.dynamic_routes[0], 0, self.gate_index)

    def gate_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Images [B, C, H, W] -> (gate-attended features at the gate, the gate's hidden features
        [B, hidden], which its width head reads). What stage two trains the width head on."""
        attended, hidden = self.gate.attend(self.forward_to_gate(x))
        return attended, hidden.flatten(1)

    def forward_from_gate(self, h: Tensor, route: Route) -> Tensor:
        """Features after the gate [B, C, H, W] -> logits along ``route``."""
        if self.plans.usable(self):
            return self.plans.route(self, route, self.gate_index + 1, len(self.units))(h)
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
        those whose confidence (``dsnet.models.policy.confidence``: the top-two softmax margin, or with
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

    # ---- the route walk, cost and extraction -----------------------------------------------
    def route_walk(self, route: Route, start: int = 0, stop: int | None = None) -> Iterator[tuple[Unit, int, int]]:
        """(unit, its input width, its choice index) for units[start:stop] along ``route``: the
        walk that inference plans, costs, extraction and pruning share."""
        ks = self._choices(route)
        return walk(self._unit_list[start:stop], ks[start:stop], self.width_at(route, start))

    def width_at(self, route: Route, index: int | None = None) -> int:
        """The width entering units[index] along ``route`` (default: the features' width)."""
        return width_after(self._unit_list[:index], self._choices(route), self.in_chans)

    def _units_cost(self, route: Route, size: tuple[int, ...], stop: int | None = None) -> tuple[int, int, tuple[int, int]]:
        """(MAdds, parameters, output hw) of units[:stop] along ``route`` at input size (C, H, W)."""
        madds = params = 0
        hw = (size[1], size[2])
        for unit, c, k in self.route_walk(route, 0, stop):
            m, p, hw = unit.cost(c, k, hw)
            madds, params = madds + m, params + p
        return madds, params, hw

    def route_cost(self, route: Route, input_size: Sequence[int] | None = None) -> RouteCost:
        """Analytic multiply-adds and parameters of one route (gate's width head excluded)."""
        size = tuple(input_size or self.default_input_size)
        key = (route, size)
        if key not in self._cost_cache:
            if len(size) != 3 or size[0] != self.in_chans or min(size) < 1:
                raise ValueError(f"input_size must be (C, H, W) with C = {self.in_chans}, got {list(size)}")
            madds, params, hw = self._units_cost(route, size)
            c = self.width_at(route)
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
        return self._units_cost(self.routes.dynamic_routes[0], size, self.gate_index + 1)[0]

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
        largest = route == self.routes.largest or largest_stats
        layers = [unit.dense(c, k, largest) for unit, c, k in self.route_walk(route)]
        net = DenseNet(nn.Sequential(*layers), self.classifier.dense(self.width_at(route)), self.drop_rate)
        return net.train(self.training)

    def _init_weights(self) -> None:
        init_weights(self, self.classifier)

    # ---- plans and copies follow the weights (dsnet.models.plans) ---------------------------------
    def _apply(self, fn, recurse=True):  # plans hold views of the old tensors
        self.plans.clear()
        return super()._apply(fn, recurse)

    def __getstate__(self):  # a copy (deepcopy, pickle) makes its own policy bias tensors
        state = super().__getstate__()
        state["_bias_cache"] = {}
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """torch's, and a ``POLICY_KEY`` entry (``dsnet.models.policy.with_policy``: a dynamic
        safetensors export, a checkpoint's ``state_dict``) becomes the deployment policy."""
        self.plans.clear()  # assign=True swaps tensors under the plans
        policy = None
        if POLICY_KEY in state_dict:
            policy, meta = Policy.from_tensor(state_dict[POLICY_KEY]), getattr(state_dict, "_metadata", None)
            state_dict = OrderedDict((k, v) for k, v in state_dict.items() if k != POLICY_KEY)
            if meta is not None:
                state_dict._metadata = meta
        result = super().load_state_dict(state_dict, strict, assign)
        if policy is not None:
            self.set_policy(policy)
        return result

    # ---- timm conventions -------------------------------------------------------------------
    default_interpolation = "bilinear"  # ds_mobilenet_v1: bicubic, as the DS-Net release trained it

    @property
    def pretrained_cfg(self) -> dict:
        """What ``timm.data.resolve_data_config({}, model=m)`` reads: dsnet's own data settings for
        this model (CIFAR-10 statistics and no crop up to 64 px, ImageNet's and 0.875 above)."""
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
        self.plans.clear()
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


class DenseNet(nn.Module):
    """A static subnet as a plain model: ``features`` -> global average pool -> dropout -> fc."""

    def __init__(self, features: nn.Sequential, fc: nn.Linear, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.features, self.fc = features, fc
        self.dropout = nn.Dropout(drop_rate)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C, H, W] -> logits [B, num_classes]."""
        return self.fc(self.dropout(self.features(x).mean((2, 3))))
