"""Slice-able layers: a layer holds its widest weights and runs any leading slice of them densely.

Width is an argument or the input's shape, never module state: ``DSConv2d.forward(x, k)`` reads
its input width from ``x.shape[1]`` and produces ``out_choices[k]`` channels. Every layer can
hand back a plain ``torch.nn`` twin holding the sliced weights (``dense``), which is what
``dsnet.extract_subnet`` assembles.

Where no autograd graph is recorded (evaluation, inference, BN recalibration, frozen weights) the
slices are views cached per width (``_SliceViews``), and the forwards read their tensors from
``self._parameters`` / ``self._buffers``: at batch 1, making a view or going through
``nn.Module.__getattr__`` costs about a microsecond per tensor, a tenth of a small layer's time.
"""
from __future__ import annotations

from typing import Callable, Hashable, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsnet.heads import width_head

try:
    from torch.compiler import is_compiling as _is_compiling
except ImportError:  # torch < 2.3
    from torch._dynamo import is_compiling as _is_compiling

__all__ = ["clear_slice_caches", "DSConv2d", "DSBatchNorm2d", "DSLinear", "DSGate", "DenseGate", "SqueezeExcite", "SqueezeExciteDense",
           "check_choices"]


def check_choices(choices: Sequence[int], what: str) -> tuple[int, ...]:
    """Validate a width list: non-empty, positive, strictly increasing. Returns it as a tuple."""
    choices = tuple(int(c) for c in choices)
    if not choices or any(c <= 0 for c in choices) or any(a >= b for a, b in zip(choices, choices[1:])):
        raise ValueError(f"{what} must be a non-empty, strictly increasing list of positive widths, "
                         f"got {list(choices)}")
    return choices


def _reuse_views(source: Tensor) -> bool:
    """Whether cached slices of ``source`` may stand in for fresh ones: no autograd graph is
    recorded through it, and no tracer or compiler is watching (they must see the slicing)."""
    return (not (torch.is_grad_enabled() and source.requires_grad) and not torch.jit.is_tracing()
            and not _is_compiling())


def _version(t: Tensor) -> int:
    """``t``'s version counter; 0 for a tensor made in inference mode, which has none (it cannot
    be changed outside inference mode, and a change inside it is not seen by the copies)."""
    return 0 if t.is_inference() else t._version


class _SliceViews:
    """Leading-slice views of a layer's tensors, made once per width and reused.

    Making a view costs microseconds per tensor per call, which at batch 1 adds up to several
    percent of a subnet's time. A view shares its source's storage, so every in-place update
    (optimizer step, ``load_state_dict``, ``weight.data.mul_``) shows through it; only a new
    storage (``module.to``, ``param.data = t``) leaves a view behind, and the data-pointer stamp
    catches that. Views are made under ``no_grad`` outside inference mode: plain tensors, valid
    wherever no gradient flows into their sources (see ``_reuse_views``).

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


def clear_slice_caches(model: nn.Module) -> nn.Module:
    """Drop every cached slice of ``model``'s dsnet layers and its DSNet's inference plans; returns
    ``model``. Needed only after editing weights through ``.data`` (hidden from the caches),
    moving one submodule of a DSNet on its own (its plans still hold the old tensors) or swapping
    in a submodule that already has forward hooks."""
    for m in model.modules():
        views = getattr(m, "_views", None)
        if isinstance(views, _SliceViews):
            views.clear()
        plans = getattr(m, "_plans", None)  # a DSNet's inference plans hold the same slices
        if isinstance(plans, dict):
            plans.clear()
            m._hook_scan = None  # and look for hooks again
    return model


def _pointwise_strided(x: Tensor, weight2d: Tensor, bias: Tensor | None) -> Tensor | None:
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


class DSConv2d(nn.Conv2d):
    """Conv2d whose active filters are the first ``out_choices[k]`` of its widest form.

    Regular (``groups=1``) or depthwise (``depthwise=True``: one filter per input channel, the
    output width follows the input). Padding is ``kernel_size // 2`` ("same" for odd kernels).
    Without autograd (evaluation, inference, frozen weights) the slices are cached: views, a
    contiguous copy for a kxk conv on a narrower input (``_SliceViews``), and a 1x1 conv whose
    slice is strided runs as a matrix product on it (``_pointwise_strided``).
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
        self._pointwise = kernel_size == 1 and stride == 1 and not depthwise
        # inputs narrower than this get a strided weight slice that the cached path keeps as a
        # contiguous copy, stamped with the weight's version counter (0: never; a 1x1 stride-1
        # conv reads its strided slice in place, a depthwise one slices filters only)
        self._copy_below = 0 if self._pointwise or depthwise else self.in_channels
        self._views = _SliceViews()

    def _slices(self, out_c: int, in_c: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(weight [out_c, in_c or 1, kh, kw], bias [out_c] or None, the weight as a strided
        [out_c, in_c] matrix if this is a 1x1 conv whose slice is not contiguous, else None)."""
        weight = self.weight[:out_c] if self.depthwise else self.weight[:out_c, :in_c]
        bias = self.bias[:out_c] if self.bias is not None else None
        strided = weight[:, :, 0, 0] if self._pointwise and not weight.is_contiguous() else None
        if in_c < self._copy_below and not torch.is_grad_enabled():  # cached: F.conv2d would copy it per call
            weight = weight.contiguous()
        return weight, bias, strided

    def forward(self, x: Tensor, k: int = -1) -> Tensor:
        """x: [B, C_in, H, W] with C_in <= widest input; returns [B, out_choices[k], H', W']."""
        in_c = x.shape[1]
        out_c = in_c if self.depthwise else self.out_choices[k]
        w, b = self._parameters["weight"], self._parameters["bias"]  # not self.weight: see top
        if _reuse_views(w):
            stamp = (w.data_ptr(), 0 if b is None else b.data_ptr(), _version(w) if in_c < self._copy_below else 0)
            weight, bias, strided = self._views.get((out_c, in_c), stamp, lambda: self._slices(out_c, in_c))
            if strided is not None and x.is_contiguous():
                y = _pointwise_strided(x, strided, bias)
                if y is not None:
                    return y
        else:
            weight, bias, _ = self._slices(out_c, in_c)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation,
                        out_c if self.depthwise else 1)

    def inference_fn(self, in_c: int, k: int = -1, watch: list[Tensor] | None = None) -> Callable[[Tensor], Tensor]:
        """This conv at input width ``in_c`` and choice ``k`` as a closure over its cached slices,
        for inference plans (``DSNet.forward`` without autograd). A slice held as a copy goes
        stale when the weight changes in place: its weight is appended to ``watch``."""
        out_c = in_c if self.depthwise else self.out_choices[k]
        w, b = self._parameters["weight"], self._parameters["bias"]
        copied = in_c < self._copy_below
        stamp = (w.data_ptr(), 0 if b is None else b.data_ptr(), _version(w) if copied else 0)
        weight, bias, strided = self._views.get((out_c, in_c), stamp, lambda: self._slices(out_c, in_c))
        if copied and watch is not None:
            watch.append(w)
        stride, padding, dilation, groups = self.stride, self.padding, self.dilation, out_c if self.depthwise else 1
        if strided is None:
            return lambda x: F.conv2d(x, weight, bias, stride, padding, dilation, groups)

        def conv(x: Tensor) -> Tensor:
            y = _pointwise_strided(x, strided, bias) if x.is_contiguous() else None
            return y if y is not None else F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        return conv

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

    def _apply(self, fn, recurse=True):  # moving or casting the module frees the old views
        self._views.clear()
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, in_choices={list(self.in_choices)}, out_choices={list(self.out_choices)}"


class DSBatchNorm2d(nn.Module):
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
        self._views = _SliceViews()

    def choice_index(self, width: int) -> int:
        try:
            return self._index[width]
        except KeyError:
            raise ValueError(f"DSBatchNorm2d got {width} channels; it has statistics for "
                             f"{list(self.choices)}") from None

    def row(self, width: int, largest: bool = False) -> int:
        """The statistics row of ``width`` (the last row on the largest route)."""
        return len(self.choices) if largest else self.choice_index(width)

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
        params, buffers = self._parameters, self._buffers  # not self.weight: see top
        w = params["weight"]
        if _reuse_views(w):  # eval, inference, BN recalibration under no_grad
            stamp = (w.data_ptr(), params["bias"].data_ptr(), buffers["running_mean"].data_ptr(),
                     buffers["running_var"].data_ptr())
            mean, var, weight, bias = self._views.get((c, largest), stamp, lambda: self._slices(c, largest))
        else:
            mean, var, weight, bias = self._slices(c, largest)
        return F.batch_norm(x, mean, var, weight, bias, self.training, factor, self.eps)

    def _slices(self, c: int, largest: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Width c's statistics (row ``row(c, largest)``) and the affine params, each [c]; the
        statistics are views that batch norm updates in place in training mode."""
        k = self.row(c, largest)
        return self.running_mean[k, :c], self.running_var[k, :c], self.weight[:c], self.bias[:c]

    def inference_fn(self, c: int, largest: bool = False) -> Callable[[Tensor], Tensor]:
        """Batch norm in eval mode at width ``c`` as a closure over views of the statistics row and
        affine slices (they follow in-place updates), for inference plans."""
        params, buffers = self._parameters, self._buffers
        stamp = (params["weight"].data_ptr(), params["bias"].data_ptr(), buffers["running_mean"].data_ptr(),
                 buffers["running_var"].data_ptr())
        mean, var, weight, bias = self._views.get((c, largest), stamp, lambda: self._slices(c, largest))
        eps = self.eps
        return lambda x: F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)

    def reset_running_stats(self, momentum: float | None = None) -> None:
        """Zero every width's statistics and set the momentum (None: cumulative average)."""
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()
        self.momentum = momentum

    def _apply(self, fn, recurse=True):  # moving or casting the module frees the old views
        self._views.clear()
        return super()._apply(fn, recurse)

    def dense(self, width: int, largest: bool = False) -> nn.BatchNorm2d:
        """A plain nn.BatchNorm2d with the affine slice and width ``width``'s own statistics."""
        k = self.row(width, largest)
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
    """Linear layer whose input width follows the input (its output width is fixed).

    BLAS reads the strided weight slice in place; without autograd the slice is a cached view.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self._views = _SliceViews()

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, F] with F <= in_features; returns [B, out_features]."""
        in_f, w = x.shape[1], self._parameters["weight"]  # not self.weight: see top
        if _reuse_views(w):
            (weight,) = self._views.get(in_f, (w.data_ptr(),), lambda: (w[:, :in_f],))
        else:
            weight = w[:, :in_f]
        return F.linear(x, weight, self.bias)

    def _apply(self, fn, recurse=True):  # moving or casting the module frees the old views
        self._views.clear()
        return super()._apply(fn, recurse)

    def inference_fn(self, in_f: int) -> Callable[[Tensor], Tensor]:
        """This layer at input width ``in_f`` as a closure over a view, for inference plans."""
        w, b = self._parameters["weight"], self._parameters["bias"]
        (weight,) = self._views.get(in_f, (w.data_ptr(),), lambda: (w[:, :in_f],))
        with torch.inference_mode(False):
            bias = None if b is None else b.detach()
        return lambda x: F.linear(x, weight, bias)

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

    def attend(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: [B, C, H, W] -> (x scaled per channel, same shape; hidden features [B, hidden, 1, 1])."""
        hidden = self.squeeze(x)
        return x * torch.sigmoid(self.expand(hidden, self.choices.index(x.shape[1]))), hidden

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C, H, W] -> x scaled per channel, same shape."""
        return self.attend(x)[0]

    def _inference_parts(self, c: int, watch: list[Tensor] | None) -> tuple[Callable, Callable]:
        """(squeeze, expand) at width ``c`` as closures over cached slices."""
        reduce = self.reduce.inference_fn(c, 0, watch)
        expand = self.expand.inference_fn(self.hidden, self.choices.index(c), watch)
        return (lambda x: torch.relu_(reduce(x.mean((2, 3), keepdim=True)))), expand

    def inference_fn(self, c: int, watch: list[Tensor] | None = None) -> Callable[[Tensor], Tensor]:
        """This block at width ``c`` as a closure, for inference plans (see DSConv2d.inference_fn)."""
        squeeze, expand = self._inference_parts(c, watch)
        return lambda x: x * torch.sigmoid(expand(squeeze(x)))

    def dense(self, width: int) -> "SqueezeExciteDense":
        return SqueezeExciteDense(self.reduce.dense(width, self.hidden), self.expand.dense(self.hidden, width))


class SqueezeExciteDense(nn.Module):
    """Plain squeeze-and-excitation with fixed widths (the extracted form of SqueezeExcite)."""

    def __init__(self, reduce: nn.Conv2d, expand: nn.Conv2d) -> None:
        super().__init__()
        self.reduce, self.expand = reduce, expand

    def attend(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """x: [B, C, H, W] -> (x scaled per channel, hidden features [B, hidden, 1, 1])."""
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
        attended, hidden = self.attend(x)
        return attended, self.width_head(hidden.flatten(1))

    def gate_fn(self, c: int, watch: list[Tensor] | None = None) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
        """``forward_gate`` at width ``c`` as a closure, for inference plans (see
        DSConv2d.inference_fn). The width head is read through views, so training it in place
        needs no rebuild; replacing the head module does (``DSNet`` keys its plan by the head)."""
        squeeze, expand = self._inference_parts(c, watch)
        head = self.width_head
        if isinstance(head, nn.Linear):
            head_w, head_b = head.weight.detach(), head.bias.detach()
            head = lambda h: F.linear(h, head_w, head_b)  # noqa: E731

        def gate(x: Tensor) -> tuple[Tensor, Tensor]:
            hidden = squeeze(x)
            return x * torch.sigmoid(expand(hidden)), head(hidden.flatten(1))
        return gate
