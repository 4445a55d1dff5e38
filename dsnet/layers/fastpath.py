"""The slice cache: how a slice-able layer's forward skips re-slicing where nothing can change.

What: where no autograd graph is recorded (evaluation, inference, BN recalibration, frozen
weights) a layer's leading slices are views made once per width and kept in the layer's
``SliceCache``, stamped with their sources' data pointers (and, for the one slice held as a
copy, the weight's version counter) so they are made again when a source is replaced or edited.
A 1x1 conv whose slice is strided runs as a matrix product on it (``pointwise_strided``).

Why: at batch 1, making a view or going through ``nn.Module.__getattr__`` per tensor per call is
a visible part of a small layer's time, and ``F.conv2d`` copies a strided kxk weight slice on
every call (docs/results.md, "Slicing overhead", measures both). The layers in
``dsnet.layers`` slice with ``weight[:out_c, :in_c]`` and call the getters here only when
``reuse_views`` says the cache is safe; ``dsnet.models.plans`` builds inference plans from the same
getters. The forwards read their tensors from ``module._parameters`` / ``module._buffers``, not
``module.weight``, for the same microsecond.
"""
from __future__ import annotations

from typing import Callable, Hashable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    from torch.compiler import is_compiling
except ImportError:  # torch < 2.3
    from torch._dynamo import is_compiling

__all__ = ["Cache", "SliceCache", "SliceCached", "clear_slice_caches", "is_compiling", "reuse_views", "tensor_version",
           "pointwise_strided"]


def reuse_views(source: Tensor) -> bool:
    """Whether cached slices of ``source`` may stand in for fresh ones: no autograd graph is
    recorded through it, and no tracer or compiler is watching (they must see the slicing)."""
    return (not (torch.is_grad_enabled() and source.requires_grad) and not torch.jit.is_tracing()
            and not is_compiling())


def tensor_version(t: Tensor) -> int:
    """``t``'s version counter; 0 for a tensor made in inference mode, which has none (it cannot
    be changed outside inference mode, and a change inside it is not seen by the copies)."""
    return 0 if t.is_inference() else t._version


class Cache:
    """Something a module keeps to run faster and ``clear_slice_caches`` drops: slices, plans."""

    def clear(self) -> None:
        raise NotImplementedError


class SliceCache(Cache):
    """Leading-slice views of a layer's tensors, made once per width and reused.

    A view shares its source's storage, so every in-place update (optimizer step,
    ``load_state_dict``, ``weight.data.mul_``) shows through it; only a new storage
    (``module.to``, ``param.data = t``) leaves a view behind, and the data-pointer stamp catches
    that. Views are made under ``no_grad`` outside inference mode: plain tensors, valid wherever
    no gradient flows into their sources (see ``reuse_views``).

    One exception copies: a kxk conv reading a narrower input than its widest needs a strided
    weight slice, which ``F.conv2d`` would copy on every call. That copy is made once and kept
    with the weight's version counter in its stamp, so optimizer steps, ``load_state_dict`` and
    any in-place edit under ``torch.no_grad()`` renew it; an edit through ``weight.data`` bypasses
    the counter, so after one call ``clear_slice_caches(model)``.
    """

    def __init__(self) -> None:
        self.entries: dict[Hashable, tuple[tuple[int, ...], tuple]] = {}

    def get(self, key: Hashable, stamp: tuple[int, ...], make: Callable[[], tuple]) -> tuple:
        """The views ``make()`` returns for ``key``, made again if the sources' data pointers
        (``stamp``) changed since."""
        hit = self.entries.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        with torch.inference_mode(False), torch.no_grad():
            views = make()
        self.entries[key] = (stamp, views)
        return views

    def clear(self) -> None:
        self.entries.clear()

    def __getstate__(self) -> dict:  # a copied or pickled layer makes its own views
        return {"entries": {}}


class SliceCached:
    """Mixin of a layer that keeps a ``slice_cache``: moving or casting the layer (``module.to``,
    ``.half()``) gives it new tensors, so its cached slices, views of the old ones, are dropped."""

    slice_cache: SliceCache

    def _apply(self, fn, recurse=True):
        self.slice_cache.clear()
        return super()._apply(fn, recurse)


def clear_slice_caches(model: nn.Module) -> nn.Module:
    """Drop every cached slice of ``model``'s dsnet layers and its DSNet's inference plans; returns
    ``model``. Needed only after editing weights through ``.data`` (hidden from the caches),
    moving one submodule of a DSNet on its own (its plans still hold the old tensors) or swapping
    in a submodule that already has forward hooks."""
    for m in model.modules():
        for value in vars(m).values():  # a layer's SliceCache, a DSNet's plans (dsnet.models.plans)
            if isinstance(value, Cache):
                value.clear()
    return model


def pointwise_strided(x: Tensor, weight2d: Tensor, bias: Tensor | None) -> Tensor | None:
    """A 1x1 stride-1 conv as a matrix product that reads a strided weight slice in place.

    x: [B, C, H, W] contiguous, weight2d: [O, C] with a row stride > C. F.conv2d would copy
    the slice to contiguous memory on every call, as costly as the product itself at batch 1 or
    on pooled [B, C, 1, 1] inputs; BLAS takes the row stride as its leading dimension instead.
    Returns [B, O, H, W], or None where the copy is small next to the conv (B > 1, H * W > 1).
    """
    b, c, h, w = x.shape
    if b == 1:
        x2d = x.view(c, h * w)
        if h * w == 1:  # a matrix-vector product: squeeze-excite at batch 1
            y = torch.mv(weight2d, x2d[:, 0]) if bias is None else torch.addmv(bias, weight2d, x2d[:, 0])
        else:
            y = torch.mm(weight2d, x2d) if bias is None else torch.addmm(bias.unsqueeze(1), weight2d, x2d)
        return y.view(1, -1, h, w)
    if h * w == 1:
        return F.linear(x.view(b, c), weight2d, bias).view(b, -1, 1, 1)
    return None
