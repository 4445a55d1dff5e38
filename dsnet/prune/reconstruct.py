"""Reconstruction-based channel pruning: ThiNet (Luo et al., ICCV 2017) and regression-based
feature reconstruction (He et al., ICCV 2017), two of the pruning methods Liu et al. (ICLR 2019)
set against training from scratch.

Both prune a model trained along the largest route to the shape of static subnet ``i`` in the
frame of ``dsnet.prune.channels``: every channel space (a conv's output or a residual stream) keeps
``space.width`` channels, which are then permuted to the front and sliced. What differs from L1
pruning is how a space's channels are chosen and that the layers reading the space are refitted.
Spaces are taken one after another (``channel_spaces`` order), each on the network pruned so far:

1. **Calibration.** The inputs of the space's *readers* (the convs with one group that read it, and
   the classifier for the last stream; squeeze-excite, a side branch, is not refitted) are sampled at ``POSITIONS`` random output positions per
   calibration image; each reader accumulates the second moments ``A = sum_s p_s p_s^T`` of its
   input patches ``p_s`` ([C * kh * kw], float64).
2. **Channel contributions.** Output ``o`` of a reader at sample ``s`` is ``y = sum_c z[s, o, c]``
   with ``z[s, o, c] = W[o, c, :] . p_s[c, :]``. Their Gram matrix over samples and outputs,
   ``G[c, d] = sum_{s, o} z[s, o, c] z[s, o, d]`` (computed from ``A`` and ``W``), is all the
   selection needs: dropping the channels ``T`` changes the outputs by ``1_T^T G 1_T`` in squared
   error. A stream sums ``G`` over its readers (identity shortcuts carry no weights to refit).
3. **Selection.** ThiNet: greedily add to ``T`` the channel that keeps ``1_T^T G 1_T`` smallest
   until ``C - width`` channels are dropped. Regression: LASSO on per-channel coefficients ``b``,
   ``min 1/2 (1 - b)^T G (1 - b) / tr(G) + lam |b|_1`` (reconstructing ``y`` by ``sum_c b_c z_c``),
   with ``lam`` bisected to the smallest value that leaves at most ``width`` coefficients non-zero;
   the ``width`` largest ``|b|`` are kept (ties, including zeros: the larger ``G[c, c]`` first, then
   the lower index).
4. **Reconstruction**, per reader. ThiNet: one scale per kept channel, the least-squares fit of
   the outputs, ``G_SS w = G_S: 1``, and ``W[:, c] *= w_c``. Regression: the reader's weights on
   the kept channels by least squares on its sampled outputs, ``A_SS W'^T = A_S: W^T``. Both
   solve for the change from the current weights (scales 1, ``W_S``) and take its minimum-norm
   solution, so with fewer samples than unknowns (the classifier sees one per image) the fit
   stays as close to the trained weights as the samples allow.
5. **Dropping.** The dropped channels' reading weights (convs, classifier, squeeze-excite) are
   zeroed, so the network computes the pruned network's function and the next space is
   calibrated on the pruned network's inputs.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dsnet.models.net import DenseNet, DSNet
from dsnet.prune.channels import ChannelSpace, prune_to

__all__ = ["METHODS", "POSITIONS", "patch_moments", "contribution_gram", "thinet_select", "lasso_select",
           "thinet_rescale", "least_squares_weights", "reconstruct_prune"]

METHODS = ("thinet", "regression")
POSITIONS = 10  # sampled output positions per image and reader, as ThiNet and He et al. sample


def _patches(module: nn.Module, x: Tensor) -> Tensor:
    """A reader's input as patches: x [B, C, H, W] (a conv) or [B, C] (the classifier)
    -> [B, L, C * kh * kw], one row per output position."""
    if x.dim() == 2:
        return x.unsqueeze(1)
    cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
    return cols.transpose(1, 2)


@torch.no_grad()
def patch_moments(model: DSNet, readers: list[nn.Module], batches: Iterable[Tensor],
                  generator: torch.Generator) -> list[Tensor]:
    """Per reader, ``A = sum_s p_s p_s^T`` over ``POSITIONS`` sampled output positions per image
    of ``batches`` (each [B, C, H, W], run along the largest route): [C * kh * kw, C * kh * kw],
    float64 on the model's device."""
    moments: list[Tensor | None] = [None] * len(readers)

    def hook(i: int) -> Callable:
        def record(module: nn.Module, args: tuple, output: Tensor) -> None:
            p = _patches(module, args[0].float())
            pick = torch.randint(p.shape[1], (p.shape[0], POSITIONS), generator=generator).to(p.device)
            rows = p.gather(1, pick.unsqueeze(2).expand(-1, -1, p.shape[2])).flatten(0, 1).double()
            moments[i] = rows.T @ rows + (0 if moments[i] is None else moments[i])
        return record

    handles = [r.register_forward_hook(hook(i)) for i, r in enumerate(readers)]
    try:
        device = next(model.parameters()).device
        for x in batches:
            model(x.to(device))
    finally:
        for h in handles:
            h.remove()
    if any(a is None for a in moments):
        raise ValueError("a layer reading a pruned channel space never ran on the calibration batches")
    return moments


def _flat_weight(module: nn.Module) -> Tensor:
    """A reader's weight as [O, C, kh * kw] (the classifier's as [O, C, 1]), float64."""
    w = module.weight.detach().double()
    return w.reshape(w.shape[0], w.shape[1], -1)


def contribution_gram(weight: Tensor, moments: Tensor) -> Tensor:
    """G[c, d] = sum_{s, o} z[s, o, c] z[s, o, d] from weight [O, C, K] and moments [C K, C K]: [C, C]."""
    o, c, k = weight.shape
    a = moments.reshape(c, k, c, k)
    # sum over o of W[o, c, k] W[o, d, l], then contracted with A[(c, k), (d, l)]
    return torch.einsum("ock,odl,ckdl->cd", weight, weight, a)


def thinet_select(gram: Tensor, width: int) -> Tensor:
    """ThiNet's greedy channel selection on gram [C, C]: indices (ascending) of the ``width`` kept."""
    c = gram.shape[0]
    dropped = torch.zeros(c, dtype=torch.bool, device=gram.device)
    along = torch.zeros(c, dtype=gram.dtype, device=gram.device)  # G 1_T
    diag = gram.diagonal()
    for _ in range(c - width):
        cost = (2 * along + diag).masked_fill(dropped, float("inf"))  # the rise of 1_T^T G 1_T
        pick = int(cost.argmin())  # ties: the lower index
        dropped[pick] = True
        along += gram[:, pick]
    return (~dropped).nonzero().flatten()


def _lasso(gram: Tensor, lam: float, iters: int = 300) -> Tensor:
    """FISTA for min_b 1/2 (1 - b)^T G (1 - b) + lam |b|_1 (G normalised, [C, C]) from b = 0: [C]."""
    step = 1.0 / max(float(torch.linalg.eigvalsh(gram)[-1]), 1e-12)
    target = gram.sum(1)  # G 1
    b = y = torch.zeros_like(target)
    t = 1.0
    for _ in range(iters):
        z = y - step * (gram @ y - target)
        nxt = z.sign() * (z.abs() - step * lam).clamp_min(0)
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        y = nxt + (t - 1) / t_next * (nxt - b)
        b, t = nxt, t_next
    return b


def _rank(primary: Tensor, secondary: Tensor, width: int) -> Tensor:
    """Indices (ascending) of the ``width`` largest ``primary``, ties by larger ``secondary``, then lower index."""
    order = torch.sort(secondary, descending=True, stable=True).indices
    order = order[torch.sort(primary[order], descending=True, stable=True).indices]
    return order[:width].sort().values


def lasso_select(gram: Tensor, width: int, steps: int = 30) -> Tensor:
    """He et al.'s channel selection on gram [C, C]: indices (ascending) of the ``width`` kept."""
    g = gram / gram.trace() if gram.trace() > 0 else gram
    hi = float(g.sum(1).abs().max())  # at lam >= max |G 1| every coefficient is zero
    if hi == 0.0:
        return _rank(torch.zeros_like(g[0]), g.diagonal(), width)
    lo, b = hi * 1e-9, _lasso(g, hi * 1e-9)
    if int((b != 0).sum()) > width:
        for _ in range(steps):  # bisect in log space: the smallest lam leaving <= width non-zero
            mid = (lo * hi) ** 0.5
            trial = _lasso(g, mid)
            if int((trial != 0).sum()) > width:
                lo = mid
            else:
                hi, b = mid, trial
        b = _lasso(g, hi) if int((b != 0).sum()) > width else b
    return _rank(b.abs(), g.diagonal(), width)


def _solve(lhs: Tensor, rhs: Tensor) -> Tensor:
    """Least-squares solution of lhs X = rhs, the minimum-norm one when lhs is singular (too few
    samples): callers solve for the change from the current weights, so that case keeps them."""
    return torch.linalg.lstsq(lhs.cpu(), rhs.cpu(), driver="gelsd").solution.to(lhs.device)


def thinet_rescale(gram: Tensor, keep: Tensor) -> Tensor:
    """ThiNet's scales of the kept channels: argmin_w sum (sum_c z_c - sum_{c in keep} w_c z_c)^2: [|keep|]."""
    inner = gram[keep][:, keep]
    return 1 + _solve(inner, gram[keep].sum(1, keepdim=True) - inner.sum(1, keepdim=True)).squeeze(1)


def least_squares_weights(weight: Tensor, moments: Tensor, keep: Tensor) -> Tensor:
    """A reader's weights on the kept channels that best reproduce its outputs on the sampled
    patches: weight [O, C, K], moments [C K, C K] -> [O, |keep|, K]."""
    o, _, k = weight.shape
    cols = (keep[:, None] * k + torch.arange(k, device=keep.device)).flatten()
    inner, kept = moments[cols][:, cols], weight[:, keep].flatten(1).T  # A_SS, W_S^T
    rhs = moments[cols] @ weight.flatten(1).T - inner @ kept  # X_S^T (Y - X_S W_S^T)
    return (kept + _solve(inner, rhs)).T.reshape(o, len(keep), k)


@torch.no_grad()
def _refit(space: ChannelSpace, method: str, model: DSNet, batches: list[Tensor], generator: torch.Generator) -> Tensor:
    """Choose ``space``'s kept channels, refit its readers, zero the dropped channels' readers."""
    moments = patch_moments(model, space.readers, batches, generator)
    weights = [_flat_weight(r) for r in space.readers]
    grams = [contribution_gram(w, a) for w, a in zip(weights, moments)]
    total = torch.stack(grams).sum(0)
    keep = (thinet_select if method == "thinet" else lasso_select)(total, space.width)
    for reader, w, a, g in zip(space.readers, weights, moments, grams):
        if method == "thinet":
            new = w[:, keep] * thinet_rescale(g, keep)[None, :, None]
        else:
            new = least_squares_weights(w, a, keep)
        reader.weight[:, keep] = new.reshape(reader.weight[:, keep].shape).to(reader.weight.dtype)
    dropped = torch.ones(space.writers[0].shape[0], dtype=torch.bool, device=keep.device)
    dropped[keep] = False
    for tensor, dim in space.members:
        if dim == 1 and isinstance(tensor, nn.Parameter):  # the weights reading the space
            tensor[:, dropped] = 0
    return keep


def reconstruct_prune(model: DSNet, subnet: int, method: str, batches: list[Tensor], seed: int = 0) -> DenseNet:
    """Prune ``model``'s largest route (trained weights and largest-route BN statistics, in eval
    mode) to static subnet ``subnet``'s shape by ``method`` ("thinet" or "regression"),
    calibrated on ``batches`` (images [B, C, H, W]); returns a plain model. ``model`` is changed
    in place."""
    if method not in METHODS:
        raise ValueError(f"reconstruction method must be one of {', '.join(METHODS)}, got '{method}'")
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    return prune_to(model, subnet, lambda space: _refit(space, method, model, batches, generator))
