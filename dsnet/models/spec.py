"""Typed architecture tables and the timm registration of dsnet's supernets."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import timm
from timm.models import is_model, register_model

from dsnet.errors import UserError
from dsnet.models.weights import read_weights

__all__ = ["StageSpec", "register", "MODELS", "create", "scale", "group_sizes"]

MODELS: dict[str, Callable[..., Any]] = {}


@dataclass(frozen=True)
class StageSpec:
    """One stage: ``depth`` blocks whose output width is ``choices[k]`` at group choice ``k``.

    ``group`` is the width group that controls the stage; ``gated`` puts the gate at its start.
    ``mid`` (bottlenecks) holds the inner widths, one per choice.
    """

    choices: tuple[int, ...]
    depth: int
    stride: int
    group: int
    kernel: int = 3
    gated: bool = False
    mid: tuple[int, ...] | None = None


def create(name: str, kwargs: Mapping[str, Any], source: str, error: type[UserError] = UserError) -> Any:
    """The dsnet supernet ``name`` from timm's registry with ``kwargs``, the one way dsnet builds
    a model from a config, a checkpoint or an architecture record (``source`` names it in the
    message); ``error`` when ``name`` is not a dsnet model or ``kwargs`` do not fit it."""
    if name not in MODELS:
        raise error(f"{source} names model '{name}', which is not a dsnet model ({', '.join(sorted(MODELS))})")
    try:
        return timm.create_model(name, **kwargs)
    except (TypeError, ValueError) as err:
        raise error(f"{source}: the kwargs {dict(kwargs)} do not fit {name}: {err}") from None


def scale(width: int, mults: tuple[float, ...]) -> tuple[int, ...]:
    """Widths ``round(width * m)`` for each multiplier (at least 1 channel each)."""
    return tuple(max(1, int(round(width * m))) for m in mults)


def register(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Register a supernet entry point with timm; a name registered twice raises."""
    name = fn.__name__
    if name in MODELS or is_model(name):
        raise RuntimeError(f"model name '{name}' is already registered with timm")

    def entry(pretrained: bool = False, **kwargs: Any) -> Any:
        overlay = {**(kwargs.pop("pretrained_cfg", None) or {}), **(kwargs.pop("pretrained_cfg_overlay", None) or {})}
        kwargs.pop("cache_dir", None)
        weights = None
        if pretrained:  # dsnet.models.weights: a run's checkpoint or a dynamic safetensors export
            if not overlay.get("file"):
                raise ValueError(f"dsnet ships no pretrained weights for '{name}'; pass "
                                 "pretrained_cfg_overlay=dict(file=PATH) with a dsnet checkpoint or a `dsnet "
                                 "export --dynamic --format safetensors` file, or use dsnet.load_checkpoint")
            weights = read_weights(overlay["file"])
            if weights.model_name != name:
                raise ValueError(f"pretrained file {overlay['file']} holds {weights.model_name}, not {name}")
            kwargs = {**weights.model_kwargs, **kwargs}
        head = {k: kwargs.pop(k) for k in ("gate_head", "gate_hidden", "gate_dropout") if k in kwargs}
        model = fn(**kwargs)
        if head:  # stage two's width head (gate.head=mlp); every family has one gate
            model.set_width_head(head.get("gate_head", "fc"), head.get("gate_hidden", 64), head.get("gate_dropout", 0.0))
        model.model_name, model.model_kwargs = name, {**kwargs, **head}
        if weights is not None:
            try:
                model.load_state_dict(weights.state)
            except RuntimeError as err:
                raise ValueError(f"pretrained file {overlay['file']} does not fit {name}({model.model_kwargs}): "
                                 f"{str(err).splitlines()[-1].strip()}") from None
        return model

    entry.__name__, entry.__doc__, entry.__module__ = name, fn.__doc__, fn.__module__
    MODELS[name] = entry
    register_model(entry)
    return entry


def group_sizes(pairs: Sequence[tuple[int, int]]) -> tuple[int, ...]:
    """Choice count per group from (group, count) pairs; stages of a group must agree."""
    sizes: dict[int, int] = {}
    for g, n in pairs:
        if sizes.setdefault(g, n) != n:
            raise ValueError(f"width group {g} has stages with {sizes[g]} and {n} choices")
    if sorted(sizes) != list(range(len(sizes))):
        raise ValueError(f"width groups must be numbered 0..N-1, got {sorted(sizes)}")
    return tuple(sizes[g] for g in range(len(sizes)))
