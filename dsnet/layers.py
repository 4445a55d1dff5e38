"""Slice-able layers: a layer holds its widest weights and runs any leading slice of them densely.

Width is an argument or the input's shape, never module state: ``DSConv2d.forward(x, k)`` reads
its input width from ``x.shape[1]`` and produces ``out_choices[k]`` channels. Every layer can
hand back a plain ``torch.nn`` twin holding the sliced weights (``dense``), which is what
``dsnet.extract_subnet`` assembles.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DSConv2d", "DSBatchNorm2d", "DSLinear", "DSGate", "SqueezeExcite", "SqueezeExciteDense",
           "check_choices"]


def check_choices(choices: Sequence[int], what: str) -> tuple[int, ...]:
    """Validate a width list: non-empty, positive, strictly increasing. Returns it as a tuple."""
    choices = tuple(int(c) for c in choices)
    if not choices or any(c <= 0 for c in choices) or any(a >= b for a, b in zip(choices, choices[1:])):
        raise ValueError(f"{what} must be a non-empty, strictly increasing list of positive widths, "
                         f"got {list(choices)}")
    return choices


class _SliceCache:
    """Contiguous copies of 2-D weight slices, reused while the weight is unchanged.

    ``weight[:o, :i]`` is a strided view; convolution kernels copy it to contiguous memory on
    every call. When no gradient is needed the copy is made once per (o, i) and reused until the
    weight changes (its version counter or storage moves), so an inference pass through the
    supernet costs what the dense model costs.
    """

    def __init__(self) -> None:
        self.entries: dict[tuple[int, int], tuple[int, int, Tensor]] = {}

    def get(self, weight: Tensor, out_c: int, in_c: int) -> Tensor:
        key = (out_c, in_c)
        stamp = (weight._version, weight.data_ptr())
        hit = self.entries.get(key)
        if hit is not None and (hit[0], hit[1]) == stamp and hit[2].dtype == weight.dtype:
            return hit[2]
        view = weight[:out_c, :in_c]
        fmt = torch.channels_last if weight.dim() == 4 and weight.is_contiguous(
            memory_format=torch.channels_last) and not weight.is_contiguous() else torch.contiguous_format
        sliced = view.detach().contiguous(memory_format=fmt)
        self.entries[key] = (stamp[0], stamp[1], sliced)
        return sliced

    def clear(self) -> None:
        self.entries.clear()


class DSConv2d(nn.Conv2d):
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
        self._cache = _SliceCache()

    def sliced_weight(self, out_c: int, in_c: int) -> Tensor:
        """[out_c, in_c (1 if depthwise), kh, kw] leading slice of the weight; cached when no grad flows."""
        if self.depthwise:
            return self.weight[:out_c]
        if out_c == self.out_channels and in_c == self.in_channels:
            return self.weight
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return self.weight[:out_c, :in_c]
        return self._cache.get(self.weight, out_c, in_c)

    def forward(self, x: Tensor, k: int = -1) -> Tensor:
        """x: [B, C_in, H, W] with C_in <= widest input; returns [B, out_choices[k], H', W']."""
        in_c = x.shape[1]
        out_c = in_c if self.depthwise else self.out_choices[k]
        bias = self.bias[:out_c] if self.bias is not None else None
        return F.conv2d(x, self.sliced_weight(out_c, in_c), bias, self.stride, self.padding,
                        self.dilation, out_c if self.depthwise else 1)

    def dense(self, in_c: int, out_c: int) -> nn.Conv2d:
        """A plain nn.Conv2d holding this layer's weights at (in_c -> out_c)."""
        if self.depthwise:
            out_c = in_c
        conv = nn.Conv2d(in_c, out_c, self.kernel_size, self.stride, self.padding,
                         groups=out_c if self.depthwise else 1, bias=self.bias is not None)
        with torch.no_grad():
            conv.weight.copy_(self.weight[:out_c] if self.depthwise else self.weight[:out_c, :in_c])
            if self.bias is not None:
                conv.bias.copy_(self.bias[:out_c])
        return conv.to(self.weight.device, self.weight.dtype)

    def _apply(self, fn, recurse=True):  # moving or casting the module invalidates cached slices
        self._cache.clear()
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, in_choices={list(self.in_choices)}, out_choices={list(self.out_choices)}"


class DSBatchNorm2d(nn.Module):
    """Switchable batch norm: private running statistics per width, shared sliced affine.

    ``running_mean`` / ``running_var`` are [num_choices, widest]; width ``choices[k]`` uses row
    k's leading entries. The width is read from the input. With ``momentum=None`` the statistics
    are a cumulative average (used for BN recalibration).
    """

    def __init__(self, choices: Sequence[int], eps: float = 1e-5, momentum: float | None = 0.1) -> None:
        super().__init__()
        self.choices = check_choices(choices, "choices")
        self.eps, self.momentum = eps, momentum
        widest, n = self.choices[-1], len(self.choices)
        self.weight = nn.Parameter(torch.ones(widest))
        self.bias = nn.Parameter(torch.zeros(widest))
        self.register_buffer("running_mean", torch.zeros(n, widest))
        self.register_buffer("running_var", torch.ones(n, widest))
        self.register_buffer("num_batches_tracked", torch.zeros(n, dtype=torch.long))
        self._index = {c: i for i, c in enumerate(self.choices)}

    def choice_index(self, width: int) -> int:
        try:
            return self._index[width]
        except KeyError:
            raise ValueError(f"DSBatchNorm2d got {width} channels; it has statistics for "
                             f"{list(self.choices)}") from None

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C, H, W] with C one of ``choices``; returns the same shape."""
        c = x.shape[1]
        k = self.choice_index(c)
        factor = 0.0
        if self.training:
            self.num_batches_tracked[k] += 1
            if self.momentum is not None:
                factor = self.momentum
            else:  # cumulative average; host sync, but only BN recalibration runs this
                factor = 1.0 / float(self.num_batches_tracked[k])
        return F.batch_norm(x, self.running_mean[k, :c], self.running_var[k, :c], self.weight[:c],
                            self.bias[:c], self.training, factor, self.eps)

    def reset_running_stats(self, momentum: float | None = None) -> None:
        """Zero every width's statistics and set the momentum (None: cumulative average)."""
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()
        self.momentum = momentum

    def dense(self, width: int) -> nn.BatchNorm2d:
        """A plain nn.BatchNorm2d with the affine slice and width ``width``'s own statistics."""
        k = self.choice_index(width)
        bn = nn.BatchNorm2d(width, eps=self.eps)
        with torch.no_grad():
            bn.weight.copy_(self.weight[:width])
            bn.bias.copy_(self.bias[:width])
            bn.running_mean.copy_(self.running_mean[k, :width])
            bn.running_var.copy_(self.running_var[k, :width])
            bn.num_batches_tracked.copy_(self.num_batches_tracked[k])
        return bn.to(self.weight.device, self.weight.dtype)

    def extra_repr(self) -> str:
        return f"choices={list(self.choices)}, eps={self.eps}, momentum={self.momentum}"


class DSLinear(nn.Linear):
    """Linear layer whose input width follows the input (its output width is fixed)."""

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, F] with F <= in_features; returns [B, out_features]."""
        return F.linear(x, self.weight[:, : x.shape[1]], self.bias)

    def dense(self, in_f: int) -> nn.Linear:
        lin = nn.Linear(in_f, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(self.weight[:, :in_f])
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin.to(self.weight.device, self.weight.dtype)


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

    def squeeze(self, x: Tensor) -> Tensor:
        """x: [B, C, H, W] -> shared hidden features [B, hidden, 1, 1] (after ReLU)."""
        return F.relu(self.reduce(x.mean((2, 3), keepdim=True)))

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C, H, W] -> x scaled per channel, same shape."""
        hidden = self.squeeze(x)
        return x * torch.sigmoid(self.expand(hidden, self.choices.index(x.shape[1])))

    def dense(self, width: int) -> "SqueezeExciteDense":
        return SqueezeExciteDense(self.reduce.dense(width, self.hidden), self.expand.dense(self.hidden, width))


class SqueezeExciteDense(nn.Module):
    """Plain squeeze-and-excitation with fixed widths (the extracted form of SqueezeExcite)."""

    def __init__(self, reduce: nn.Conv2d, expand: nn.Conv2d) -> None:
        super().__init__()
        self.reduce, self.expand = reduce, expand

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.expand(torch.relu(self.reduce(x.mean((2, 3), keepdim=True)))))


class DSGate(SqueezeExcite):
    """Double-headed gate: a squeeze-excite whose shared hidden features also feed a width head.

    Head A (``expand``, channel attention) trains with the supernet in stage one; head B
    (``width_head``: FC -> logits over the routing space) trains in stage two.
    """

    def __init__(self, choices: Sequence[int], num_routes: int, ratio: float = 0.25) -> None:
        super().__init__(choices, ratio)
        self.width_head = nn.Linear(self.hidden, num_routes)
        nn.init.zeros_(self.width_head.weight)
        nn.init.zeros_(self.width_head.bias)

    def forward_gate(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: [B, C, H, W] -> (attended x [B, C, H, W], route logits [B, num_routes])."""
        hidden = self.squeeze(x)
        x = x * torch.sigmoid(self.expand(hidden, self.choices.index(x.shape[1])))
        return x, self.width_head(hidden.flatten(1))
