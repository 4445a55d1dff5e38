"""A static baseline's plain model, rebuilt from its checkpoint, and what it costs.

A ``static`` checkpoint (``dsnet train-baseline``) holds a static subnet of a supernet, an
architecture found by pruning (its ``architecture`` record, ``dsnet.prune.arch``) or SSS's largest
route with its branch factors (``dsnet.prune.sss``). ``load_static`` rebuilds the plain model and
the supernet it was cut from; ``static_cost`` prices it; ``dsnet evaluate``, ``profile``, ``export``
and ``bench`` read baselines through these two.
"""
from __future__ import annotations

from dsnet.models.net import DenseNet, DSNet, RouteCost, init_weights
from dsnet.models.spec import create
from dsnet.prune.arch import Architecture, arch_cost, load_arch_state
from dsnet.prune.baseline_spec import check_subnet
from dsnet.prune.budgets import Subnet
from dsnet.prune.sss import add_scales, scale_keys
from dsnet.train.checkpoint import CheckpointError

__all__ = ["plain_subnet", "tag_plain", "load_static", "static_cost", "baseline_report"]


def plain_subnet(supernet: DSNet, subnet: Subnet) -> DenseNet:
    """Static subnet ``subnet`` of ``supernet`` as a plain model, freshly initialised."""
    check_subnet(supernet, subnet)
    model = supernet.extract(supernet.routes.resolve(subnet))
    init_weights(model, model.fc)  # the init of its own shape, not slices of a wider one
    return tag_plain(model, supernet)


def tag_plain(model: DenseNet, supernet: DSNet) -> DenseNet:
    """``model`` (a plain model cut from ``supernet``) named as its supernet, for its checkpoints."""
    model.model_name, model.model_kwargs = supernet.model_name, dict(supernet.model_kwargs)
    return model


def load_static(state: dict) -> tuple[DenseNet, DSNet]:
    """(the plain model of a ``static`` checkpoint read with ``read_checkpoint``, in eval mode;
    the supernet it was cut from, for its costs): a static subnet, an architecture (its
    ``architecture`` record) or SSS's largest route with its branch factors."""
    if state.get("architecture") is not None:
        return load_arch_state(state)[:2]
    supernet = create(state["model_name"], dict(state["model_kwargs"]), "the checkpoint", CheckpointError)
    model = plain_subnet(supernet, state["subnet"])
    if scale_keys(state["model"]):
        add_scales(model, supernet)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint weights do not fit subnet {state['subnet']} of "
                              f"{state['model_name']}: {str(err).splitlines()[-1].strip()}") from None
    return model.eval(), supernet


def static_cost(state: dict, supernet: DSNet, size) -> RouteCost:
    """MAdds of one ``size`` (C, H, W) sample and parameters of a static checkpoint's plain model
    (SSS's branch factors are parameters; their products are not MAdds, as BN's are not)."""
    if state.get("architecture") is not None:
        return arch_cost(supernet, Architecture.from_dict(state["architecture"]), size)
    cost = supernet.route_cost(supernet.routes.resolve(state["subnet"]), size)
    return cost._replace(params=cost.params + len(scale_keys(state["model"])))


def baseline_report(subnet: Subnet, cost, acc: dict) -> dict:
    """A baseline's eval.json-shaped report: one static row (``cost`` a RouteCost, ``acc``
    ``evaluate_plain``'s result), no largest route, no dynamic model."""
    return {"static": [{"subnet": subnet, "madds": cost.madds, "params": cost.params,
                        "top1": acc["top1"], "top5": acc["top5"]}],
            "largest": None, "dynamic": None, "num_samples": acc["num_samples"]}
