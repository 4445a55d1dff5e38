"""Non-structured weight pruning (Han et al., NeurIPS 2015), the weight-level baseline of Liu et
al. (ICLR 2019).

One global magnitude threshold over every conv and linear weight of a plain model: at sparsity
``s`` the ``round(s * N)`` weights of smallest ``|w|`` (of ``N`` in all) are set to zero, the rest
kept. Ties at the threshold are broken by position: layers in module order, then the flat index
inside a weight; the earlier weight is kept. Biases, batch norms and depthwise-vs-regular
make no difference: every ``nn.Conv2d`` and ``nn.Linear`` weight is in the pool.

The masks live in the weights themselves (a pruned weight is exactly zero), so a checkpoint, an
evaluation and an export of the fine-tuned model carry them without any extra tensor. During
fine-tuning ``keep_masks`` holds them: the pruned weights' gradients are zeroed as they are
computed (so clipping and momentum never see them) and, after every optimizer step, the pruned
weights and their optimizer state (momentum, Adam moments) are zeroed again.

Cost: a sparse model does one multiply-add per non-zero weight per output position, so its
sparse MAdds are the dense MAdds minus, for every zero weight, the output positions of its layer
(``H_out x W_out`` for a conv, 1 for a linear layer), as Liu et al. count it for Scratch-B.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["prunable", "magnitude_masks", "apply_masks", "keep_masks", "weight_madds", "sparse_madds"]


def prunable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every conv and linear layer, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@torch.no_grad()
def magnitude_masks(model: nn.Module, sparsity: float) -> dict[str, Tensor]:
    """Masks (bool, True = kept, each shaped as its weight) of the global magnitude threshold
    at ``sparsity`` in [0, 1): exactly ``round(sparsity * N)`` weights are pruned; ties kept in
    module and flat-index order."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"--sparsity must be a fraction in [0, 1) of the weights to prune, got {sparsity}")
    layers = prunable(model)
    flat = torch.cat([m.weight.detach().abs().flatten().float() for _, m in layers])
    kept = flat.numel() - round(sparsity * flat.numel())
    order = torch.sort(flat, descending=True, stable=True).indices  # stable: the earlier weight first
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[order[:kept]] = True
    masks, start = {}, 0
    for name, m in layers:
        masks[name] = keep[start:start + m.weight.numel()].view_as(m.weight)
        start += m.weight.numel()
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, Tensor]) -> nn.Module:
    """Zero the pruned weights of ``model`` in place; returns ``model``."""
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        modules[name].weight.mul_(mask.to(modules[name].weight.device))
    return model


def keep_masks(model: nn.Module, masks: dict[str, Tensor], optimizer: torch.optim.Optimizer) -> list:
    """Hold ``masks`` through training: zero the pruned weights' gradients as they are computed
    and, after every ``optimizer.step()``, the pruned weights and their optimizer state again.
    Returns the hook handles (``handle.remove()`` ends it)."""
    modules = dict(model.named_modules())
    pairs = [(modules[n].weight, m.to(modules[n].weight.device)) for n, m in masks.items()]
    handles = [w.register_hook(lambda g, m=m: g * m) for w, m in pairs]

    @torch.no_grad()
    def reapply(opt: torch.optim.Optimizer, args, kwargs) -> None:
        for w, m in pairs:
            w.mul_(m)
            for value in opt.state.get(w, {}).values():
                if torch.is_tensor(value) and value.shape == w.shape:
                    value.mul_(m)

    handles.append(optimizer.register_step_post_hook(reapply))
    return handles


@torch.no_grad()
def weight_madds(model: nn.Module, input_size: Sequence[int], nonzero: bool = True) -> int:
    """Multiply-adds of ``model``'s conv and linear weights on one input of ``input_size``
    (C, H, W): for each layer, its (non-zero, with ``nonzero``) weights x its output positions."""
    positions: dict[nn.Module, int] = {}

    def record(module: nn.Module, args, output: Tensor) -> None:
        positions[module] = output[0, 0].numel() if isinstance(module, nn.Conv2d) else 1

    layers = [m for _, m in prunable(model)]
    handles = [m.register_forward_hook(record) for m in layers]
    try:
        p = next(model.parameters())
        was_training = model.training
        model.eval()(torch.zeros(1, *input_size, device=p.device, dtype=p.dtype))
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    count = (lambda w: int(torch.count_nonzero(w))) if nonzero else (lambda w: w.numel())
    return sum(count(m.weight) * positions[m] for m in layers if m in positions)


def sparse_madds(model: nn.Module, dense_madds: int, input_size: Sequence[int]) -> int:
    """``dense_madds`` (the model's MAdds as a dense network) less one multiply-add per zero conv
    or linear weight per output position of its layer."""
    return dense_madds - (weight_madds(model, input_size, nonzero=False) - weight_madds(model, input_size))
