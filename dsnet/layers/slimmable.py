"""Slice-able layers: a layer holds its widest weights and runs any leading slice of them densely.

Width is an argument or the input's shape, never module state: ``DSConv2d.forward(x, k)`` reads
its input width from ``x.shape[1]`` and produces ``out_choices[k]`` channels. Each layer has one
slice accessor, ``active``, shared by ``forward`` and by ``dense``, which hands back a plain
``torch.nn`` twin holding the sliced weights (what ``dsnet.extract_subnet`` assembles).

Where no autograd graph is recorded, ``forward`` takes its slices from the layer's
``slice_cache`` instead of slicing again (``dsnet.layers.fastpath``: what is cached, when it is renewed,
and why), and ``DSNet`` runs routes as inference plans over the same cache (``dsnet.models.plans``).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsnet.layers.fastpath import SliceCache, SliceCached, pointwise_strided, reuse_views, tensor_version
from dsnet.layers.heads import width_head

__all__ = ["DSConv2d", "DSBatchNorm2d", "DSLinear", "DSGate", "DenseGate", "SqueezeExcite", "SqueezeExciteDense",
           "channel_attention", "gate_forward", "check_choices", "conv_slices",
           "bn_slices", "linear_slice"]


def check_choices(choices: Sequence[int], what: str) -> tuple[int, ...]:
    """Validate a width list: non-empty, positive, strictly increasing. Returns it as a tuple."""
    choices = tuple(int(c) for c in choices)
    if not choices or any(c <= 0 for c in choices) or any(a >= b for a, b in zip(choices, choices[1:])):
        raise ValueError(f"{what} must be a non-empty, strictly increasing list of positive widths, "
                         f"got {list(choices)}")
    return choices


class DSConv2d(SliceCached, nn.Conv2d):
    """Conv2d whose active filters are the first ``out_choices[k]`` of its widest form.

    Regular (``groups=1``) or depthwise (``depthwise=True``: one filter per input channel, the
    output width follows the input). Padding is ``kernel_size // 2`` ("same" for odd kernels).
    """

    def __init__(self, in_choices: Sequence[int], out_choices: Sequence[int], kernel_size: int = 1,
                 stride: int = 1, depthwise: bool = False, bias: bool = False) -> None:
        in_choices = check_choices(in_choices, "in_choices")
        out_choices = check_choices(out_choices, "out_choices")
        if depthwise and in_choices != out_choices:
            raise ValueError(f"a depthwise conv keeps its width: in_choices {list(in_choices)} "
                             f"!= out_choices {list(out_choices)}")
        super().__init__(in_choices[-1], out_choices[-1], kernel_size, stride, kernel_size // 2,
                         groups=out_choices[-1] if depthwise else 1, bias=bias)
        self.in_choices, self.out_choices, self.depthwise = in_choices, out_choices, depthwise
        self.pointwise = kernel_size == 1 and stride == 1 and not depthwise  # a matrix product per pixel
        self.slice_cache = SliceCache()

    def active(self, out_c: int, in_c: int) -> tuple[Tensor, Tensor | None]:
        """The leading slices at (in_c -> out_c): weight [out_c, in_c (1 if depthwise), kh, kw]
        and bias [out_c] or None. A depthwise conv's ``out_c`` must equal ``in_c``."""
        weight = self.weight[:out_c] if self.depthwise else self.weight[:out_c, :in_c]
        return weight, self.bias[:out_c] if self.bias is not None else None

    def forward(self, x: Tensor, k: int = -1) -> Tensor:
        """x: [B, C_in, H, W] with C_in <= widest input; returns [B, out_choices[k], H', W']."""
        in_c = x.shape[1]
        out_c = in_c if self.depthwise else self.out_choices[k]
        if reuse_views(self._parameters["weight"]):  # no autograd: the cached slices
            weight, bias, strided, _ = conv_slices(self, out_c, in_c)
            if strided is not None and x.is_contiguous():
                y = pointwise_strided(x, strided, bias)
                if y is not None:
                    return y
        else:
            weight, bias = self.active(out_c, in_c)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation,
                        out_c if self.depthwise else 1)

    def dense(self, in_c: int, out_c: int) -> nn.Conv2d:
        """A plain nn.Conv2d holding this layer's weights at (in_c -> out_c)."""
        if self.depthwise:
            out_c = in_c
        conv = nn.Conv2d(in_c, out_c, self.kernel_size, self.stride, self.padding,
                         groups=out_c if self.depthwise else 1, bias=self.bias is not None)
        weight, bias = self.active(out_c, in_c)
        with torch.no_grad():
            conv.weight.copy_(weight)
            if bias is not None:
                conv.bias.copy_(bias)
        return conv.to(self.weight.device, self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, in_choices={list(self.in_choices)}, out_choices={list(self.out_choices)}"


class DSBatchNorm2d(SliceCached, nn.Module):
    """Switchable batch norm: private running statistics per width, shared sliced affine.

    ``running_mean`` / ``running_var`` are [num_choices + 1, widest]; width ``choices[k]`` uses
    row k's leading entries, and the largest route uses the last row (``largest=True``): the
    largest route and the widest static subnet reach a gated layer at the same width but from
    differently wide earlier layers, so one row would mix two distributions. The width is read
    from the input. With ``momentum=None`` the statistics are a cumulative average (used for BN
    recalibration).
    """

    def __init__(self, choices: Sequence[int], eps: float = 1e-5, momentum: float | None = 0.1) -> None:
        super().__init__()
        self.choices = check_choices(choices, "choices")
        self.eps, self.momentum = eps, momentum
        widest, n = self.choices[-1], len(self.choices)
        self.weight = nn.Parameter(torch.ones(widest))
        self.bias = nn.Parameter(torch.zeros(widest))
        self.register_buffer("running_mean", torch.zeros(n + 1, widest))
        self.register_buffer("running_var", torch.ones(n + 1, widest))
        self.register_buffer("num_batches_tracked", torch.zeros(n + 1, dtype=torch.long))
        self._index = {c: i for i, c in enumerate(self.choices)}
        self.slice_cache = SliceCache()

    def choice_index(self, width: int) -> int:
        try:
            return self._index[width]
        except KeyError:
            raise ValueError(f"DSBatchNorm2d got {width} channels; it has statistics for "
                             f"{list(self.choices)}") from None

    def row(self, width: int, largest: bool = False) -> int:
        """The statistics row of ``width`` (the last row on the largest route)."""
        return len(self.choices) if largest else self.choice_index(width)

    def active(self, c: int, largest: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Width c's (running mean, running var, weight, bias), each [c]: row ``row(c, largest)``
        of the statistics, views that batch norm updates in place in training mode."""
        k = self.row(c, largest)
        return self.running_mean[k, :c], self.running_var[k, :c], self.weight[:c], self.bias[:c]

    def forward(self, x: Tensor, largest: bool = False) -> Tensor:
        """x: [B, C, H, W] with C one of ``choices``; returns the same shape."""
        c = x.shape[1]
        factor = 0.0
        if self.training:
            k = self.row(c, largest)
            self.num_batches_tracked[k] += 1
            if self.momentum is not None:
                factor = self.momentum
            else:  # cumulative average; host sync, but only BN recalibration runs this
                factor = 1.0 / float(self.num_batches_tracked[k])
        if reuse_views(self._parameters["weight"]):  # eval, inference, BN recalibration under no_grad
            mean, var, weight, bias = bn_slices(self, c, largest)
        else:
            mean, var, weight, bias = self.active(c, largest)
        return F.batch_norm(x, mean, var, weight, bias, self.training, factor, self.eps)

    def reset_running_stats(self, momentum: float | None = None) -> None:
        """Zero every width's statistics and set the momentum (None: cumulative average)."""
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()
        self.momentum = momentum

    def dense(self, width: int, largest: bool = False) -> nn.BatchNorm2d:
        """A plain nn.BatchNorm2d with the affine slice and width ``width``'s own statistics."""
        bn = nn.BatchNorm2d(width, eps=self.eps)
        mean, var, weight, bias = self.active(width, largest)
        with torch.no_grad():
            bn.weight.copy_(weight)
            bn.bias.copy_(bias)
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.num_batches_tracked.copy_(self.num_batches_tracked[self.row(width, largest)])
        return bn.to(self.weight.device, self.weight.dtype)

    def extra_repr(self) -> str:
        return f"choices={list(self.choices)}, eps={self.eps}, momentum={self.momentum}"


class DSLinear(SliceCached, nn.Linear):
    """Linear layer whose input width follows the input (its output width is fixed).

    BLAS reads the strided weight slice in place.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self.slice_cache = SliceCache()

    def active(self, in_f: int) -> Tensor:
        """The weight's leading slice for ``in_f`` input features: [out_features, in_f]."""
        return self.weight[:, :in_f]

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, F] with F <= in_features; returns [B, out_features]."""
        in_f = x.shape[1]
        weight = linear_slice(self, in_f) if reuse_views(self._parameters["weight"]) else self.active(in_f)
        return F.linear(x, weight, self.bias)

    def dense(self, in_f: int) -> nn.Linear:
        lin = nn.Linear(in_f, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(self.active(in_f))
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin.to(self.weight.device, self.weight.dtype)


_Fn = Callable[[Tensor], Tensor]


def channel_attention(x: Tensor, reduce: _Fn, expand: _Fn) -> tuple[Tensor, Tensor]:
    """The squeeze-excite formula, written once for the slice-able, the plain and the planned forms
    (``dsnet.models.plans``): x [B, C, H, W] -> (x * sigmoid(expand(hidden)) [B, C, H, W], hidden), where
    hidden = relu(reduce(x averaged over H, W)) [B, hidden, 1, 1]; ``reduce`` and ``expand`` are
    the 1x1 convolutions at x's width."""
    hidden = torch.relu(reduce(x.mean((2, 3), keepdim=True)))
    return x * torch.sigmoid(expand(hidden)), hidden


def gate_forward(x: Tensor, reduce: _Fn, expand: _Fn, width_head: _Fn) -> tuple[Tensor, Tensor]:
    """The double-headed gate, written once: x [B, C, H, W] -> (the channel attention's output
    [B, C, H, W], route logits [B, R] from ``width_head`` on the same hidden features [B, hidden])."""
    attended, hidden = channel_attention(x, reduce, expand)
    return attended, width_head(hidden.flatten(1))


class SqueezeExcite(nn.Module):
    """Channel attention over a slice-able width: pool -> FC -> ReLU -> FC -> sigmoid -> scale.

    The hidden width is fixed (``round(widest * ratio)``), as in the DS-MBNet release; the
    input and output FCs slice with the input width.
    """

    def __init__(self, choices: Sequence[int], ratio: float = 0.25) -> None:
        super().__init__()
        self.choices = check_choices(choices, "choices")
        self.hidden = max(1, round(self.choices[-1] * ratio))
        self.reduce = DSConv2d(self.choices, (self.hidden,), 1, bias=True)
        self.expand = DSConv2d((self.hidden,), self.choices, 1, bias=True)

    def expand_at(self, width: int) -> _Fn:
        """``expand`` producing ``width`` channels: hidden [B, hidden, 1, 1] -> [B, width, 1, 1]."""
        return partial(self.expand, k=self.choices.index(width))

    def squeeze(self, x: Tensor) -> Tensor:
        """x: [B, C, H, W] -> shared hidden features [B, hidden, 1, 1] (after ReLU)."""
        return self.attend(x)[1]

    def attend(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: [B, C, H, W] -> (x scaled per channel, same shape; hidden features [B, hidden, 1, 1])."""
        return channel_attention(x, self.reduce, self.expand_at(x.shape[1]))

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C, H, W] -> x scaled per channel, same shape."""
        return self.attend(x)[0]

    def dense(self, width: int) -> "SqueezeExciteDense":
        return SqueezeExciteDense(self.reduce.dense(width, self.hidden), self.expand.dense(self.hidden, width))


class SqueezeExciteDense(nn.Module):
    """Plain squeeze-and-excitation with fixed widths (the extracted form of SqueezeExcite)."""

    def __init__(self, reduce: nn.Conv2d, expand: nn.Conv2d) -> None:
        super().__init__()
        self.reduce, self.expand = reduce, expand

    def attend(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """x: [B, C, H, W] -> (x scaled per channel, hidden features [B, hidden, 1, 1]).
        ``channel_attention`` written out: TorchScript (the export) cannot script a function argument."""
        hidden = torch.relu(self.reduce(x.mean((2, 3), keepdim=True)))
        return x * torch.sigmoid(self.expand(hidden)), hidden

    def forward(self, x: Tensor) -> Tensor:
        return self.attend(x)[0]


class DenseGate(SqueezeExciteDense):
    """The double-headed gate as plain layers (the extracted form of DSGate): the channel
    attention of SqueezeExciteDense, and route logits from the width head on the same hidden
    features."""

    def __init__(self, reduce: nn.Conv2d, expand: nn.Conv2d, width_head: nn.Module) -> None:
        super().__init__(reduce, expand)
        self.width_head = width_head

    def forward_gate(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """x: [B, C, H, W] -> (attended x [B, C, H, W], route logits [B, R])."""
        attended, hidden = self.attend(x)
        return attended, self.width_head(hidden.flatten(1))


class DSGate(SqueezeExcite):
    """Double-headed gate: a squeeze-excite whose shared hidden features also feed a width head.

    Head A (``expand``, channel attention) trains with the supernet in stage one; head B
    (``width_head``: FC -> logits over the routing space) trains in stage two.
    """

    def __init__(self, choices: Sequence[int], num_routes: int, ratio: float = 0.25) -> None:
        super().__init__(choices, ratio)
        self.width_head: nn.Module = width_head("fc", self.hidden, num_routes)

    def forward_gate(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: [B, C, H, W] -> (attended x [B, C, H, W], route logits [B, num_routes])."""
        return gate_forward(x, self.reduce, self.expand_at(x.shape[1]), self.width_head)


# ---- the cached slices: ``active`` kept in a layer's ``slice_cache`` (dsnet.layers.fastpath) ----

def conv_slices(conv: DSConv2d, out_c: int, in_c: int) -> tuple[Tensor, Tensor | None, Tensor | None, bool]:
    """``conv.active(out_c, in_c)`` from ``conv.slice_cache``: (weight [out_c, in_c or 1, kh, kw],
    bias [out_c] or None, the weight as a strided [out_c, in_c] matrix for a 1x1 stride-1 conv
    whose slice is not contiguous (else None), whether the weight is held as a copy).

    The copy: a kxk conv (not depthwise) on an input narrower than its widest gets a strided
    slice, which F.conv2d would copy per call; it is copied once and stamped with the version."""
    w, b = conv._parameters["weight"], conv._parameters["bias"]
    copied = in_c < conv.in_channels and not (conv.pointwise or conv.depthwise)
    stamp = (w.data_ptr(), 0 if b is None else b.data_ptr(), tensor_version(w) if copied else 0)

    def make() -> tuple[Tensor, Tensor | None, Tensor | None]:
        weight, bias = conv.active(out_c, in_c)
        strided = weight[:, :, 0, 0] if conv.pointwise and not weight.is_contiguous() else None
        return weight.contiguous() if copied else weight, bias, strided
    return (*conv.slice_cache.get((out_c, in_c), stamp, make), copied)


def bn_slices(bn: DSBatchNorm2d, c: int, largest: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``bn.active(c, largest)`` (mean, var, weight, bias, each [c]) from ``bn.slice_cache``."""
    params, buffers = bn._parameters, bn._buffers
    stamp = (params["weight"].data_ptr(), params["bias"].data_ptr(), buffers["running_mean"].data_ptr(),
             buffers["running_var"].data_ptr())
    return bn.slice_cache.get((c, largest), stamp, lambda: bn.active(c, largest))


def linear_slice(linear: DSLinear, in_f: int) -> Tensor:
    """``linear.active(in_f)`` (weight [out_features, in_f]) from ``linear.slice_cache``."""
    w = linear._parameters["weight"]
    return linear.slice_cache.get(in_f, (w.data_ptr(),), lambda: (linear.active(in_f),))[0]
