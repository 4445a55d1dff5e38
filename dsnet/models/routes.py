"""Width groups, routes and the routing space.

A supernet's stages are grouped into width groups; each group has ``group_sizes[g]`` channel
choices. A *route* is a tuple with one choice index per group. dsnet follows the DS-Net rule for
every model: the last group is the *gated* group, the earlier ones are *base* groups.

- static subnet ``i``: base groups at their slimmest choice, the gated group at choice ``i``
  (index 0 = slimmest subnet);
- the largest route: every group at its widest (the stage-one teacher);
- the routing space: the gated-group choices a gate may pick (a subset of the static subnets).

Walking a route: a supernet's units run one after another, each unit's input width the width the
previous one put out (``out_width(in_width, choice)``). ``walk`` is that walk, written once:
``DSNet.route_walk`` (inference plans, costs, extraction, pruning) and residual blocks (their
body) use it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Protocol, Sequence, TypeVar

import torch

__all__ = ["Route", "RouteTable", "Walked", "walk", "width_after", "fixed_route"]

Route = tuple[int, ...]


class Walked(Protocol):
    """What a route walks over: a unit (or a residual block's step) that knows its output width."""

    def out_width(self, in_c: int, k: int) -> int: ...


U = TypeVar("U", bound=Walked)


def walk(units: Iterable[U], choices: Iterable[int], in_width: int) -> Iterator[tuple[U, int, int]]:
    """(unit, its input width, its choice index) along ``units``, starting at ``in_width``."""
    for unit, k in zip(units, choices):
        yield unit, in_width, k
        in_width = unit.out_width(in_width, k)


def width_after(units: Iterable[Walked], choices: Iterable[int], in_width: int) -> int:
    """The width ``units`` put out when walked from ``in_width`` with ``choices``."""
    width = in_width
    for unit, c, k in walk(units, choices, in_width):
        width = unit.out_width(c, k)
    return width


@dataclass(frozen=True)
class RouteTable:
    """The routes of a supernet with ``group_sizes`` choices per width group (last group gated)."""

    group_sizes: tuple[int, ...]
    routing_space: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.group_sizes or any(n < 1 for n in self.group_sizes):
            raise ValueError(f"group_sizes must be positive, got {list(self.group_sizes)}")
        space, n = self.routing_space, self.num_subnets
        if (not space or list(space) != sorted(set(space)) or space[0] < 0 or space[-1] >= n):
            raise ValueError(f"routing_space must be distinct, sorted subnet indices in 0..{n - 1}, "
                             f"got {list(space)}")

    @property
    def num_subnets(self) -> int:
        return self.group_sizes[-1]

    @property
    def largest(self) -> Route:
        return tuple(n - 1 for n in self.group_sizes)

    def static(self, i: int) -> Route:
        """Route of static subnet ``i`` (negative indices count from the widest)."""
        n = self.num_subnets
        if not -n <= i < n:
            raise ValueError(f"subnet index {i} is out of range: this supernet has {n} static "
                             f"subnets (0..{n - 1})")
        return (0,) * (len(self.group_sizes) - 1) + (i % n,)

    @property
    def static_routes(self) -> list[Route]:
        return [self.static(i) for i in range(self.num_subnets)]

    @property
    def dynamic_routes(self) -> list[Route]:
        """The routes a gate can pick, in the order of its logits."""
        return [self.static(i) for i in self.routing_space]

    def sample(self, generator: torch.Generator, n: int, low: int = 1) -> list[Route]:
        """``n`` static routes drawn uniformly from subnets ``low..num_subnets-1`` (DS-Net's sandwich).

        Draws with replacement from a caller-owned generator, so the training loop controls the
        seed; with a single subnet the slimmest is returned.
        """
        low = min(low, self.num_subnets - 1)
        picks = torch.randint(low, self.num_subnets, (n,), generator=generator).tolist()
        return [self.static(i) for i in picks]

    def resolve(self, subnet: int | str | Sequence[int] | None) -> Route:
        """A route from a subnet index, "largest"/None, or an explicit tuple of choice indices."""
        if subnet is None or subnet == "largest":
            return self.largest
        if isinstance(subnet, int):
            return self.static(subnet)
        if isinstance(subnet, (tuple, list)) and len(subnet) == len(self.group_sizes) and all(
                isinstance(c, int) and 0 <= c < n for c, n in zip(subnet, self.group_sizes)):
            return tuple(subnet)
        raise ValueError(f"subnet must be an index in 0..{self.num_subnets - 1}, 'largest', "
                         f"'dynamic' or a route of {len(self.group_sizes)} choice indices "
                         f"(group sizes {list(self.group_sizes)}), got {subnet!r}")


def fixed_route(model, subnet: int | str | Sequence[int] | None) -> Route:
    """``model.routes.resolve(subnet)`` for a fixed route (counting, extraction); the dynamic model
    is refused: its route depends on each input."""
    if subnet == "dynamic":
        raise ValueError("the dynamic model's cost depends on each input's route: use "
                         "model.dynamic_costs() for per-route MAdds or `dsnet evaluate` for the mean")
    return model.routes.resolve(subnet)
