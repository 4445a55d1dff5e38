"""The slice cache (dsnet.layers.fastpath): cached slices follow every way a layer's weights change
(in-place edits, optimizer steps, new storage, copies, dtype moves), and a strided kxk slice is
copied once, not per call."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch.testing import assert_close

from dsnet.layers.fastpath import clear_slice_caches
from dsnet.layers import DSBatchNorm2d, DSLinear
from tests.test_layers import IN, OUT, ds_conv, plain_bn, plain_conv, randn_on


def test_conv_cached_slice_follows_in_place_weight_updates(device, gen):
    ds = ds_conv(gen, device, 3, 1, True).eval()
    x = randn_on(gen, 2, IN[0], 7, 7, device=device)
    with torch.no_grad():
        ds(x, 0)  # fill the cache: a contiguous copy of the strided 3x3 slice
        ds.weight.mul_(-0.5)  # bumps the weight's version counter
        assert_close(ds(x, 0), plain_conv(ds, IN[0], OUT[0])(x))
        wide = randn_on(gen, 2, IN[1], 7, 7, device=device)
        ds(wide, 0)  # the full input width slices the leading filters: a view, no copy
        ds.weight.data.mul_(2)  # `.data` has its own version counter: only views see it
        assert_close(ds(wide, 0), plain_conv(ds, IN[1], OUT[0])(wide))
        clear_slice_caches(ds)  # what the docs prescribe after `.data` edits
        assert_close(ds(x, 0), plain_conv(ds, IN[0], OUT[0])(x))
    with torch.inference_mode():
        ds(x, 0)
    ds.load_state_dict({n: torch.randn(t.shape, generator=gen) for n, t in ds.state_dict().items()})
    with torch.inference_mode():
        assert_close(ds(x, 0), plain_conv(ds, IN[0], OUT[0])(x))


def test_conv_copies_a_strided_kxk_slice_once_not_per_call(device, gen):
    ds = ds_conv(gen, device, 3, 1, False).eval()
    x = randn_on(gen, 1, IN[0], 5, 5, device=device)
    with torch.inference_mode():
        ds(x, 0)
        (first,) = [views[0] for _, views in ds.slice_cache.entries.values()]
        ds(x, 0)
        (again,) = [views[0] for _, views in ds.slice_cache.entries.values()]
    assert again is first and first.is_contiguous() and first.shape == (OUT[0], IN[0], 3, 3)


def test_conv_cached_slice_follows_new_storage_and_copies(device, gen):
    ds = ds_conv(gen, device, 1, 1, True).eval()
    x = randn_on(gen, 1, IN[0], 4, 4, device=device)
    with torch.no_grad():
        ds(x, 0)
        ds.weight.data = torch.randn(ds.weight.shape, generator=gen).to(device)
        ds.bias.data = torch.randn(ds.bias.shape, generator=gen).to(device)
        assert_close(ds(x, 0), plain_conv(ds, IN[0], OUT[0])(x))
        twin = copy.deepcopy(ds)
        expected = twin(x, 0)
        ds.weight.mul_(3)
        assert_close(twin(x, 0), expected)
        assert_close(twin(x, 0), plain_conv(twin, IN[0], OUT[0])(x))
        assert_close(ds(x, 0), plain_conv(ds, IN[0], OUT[0])(x))


def test_bn_and_linear_cached_slices_follow_in_place_updates(device, gen, randomize_bn):
    bn = randomize_bn(DSBatchNorm2d(IN).to(device), gen)
    lin = DSLinear(16, 5).to(device)
    x, f = randn_on(gen, 2, IN[0], 3, 3, device=device), randn_on(gen, 2, IN[0], device=device)
    with torch.inference_mode():
        bn(x), lin(f)
    bn.running_mean.data.add_(0.5)
    bn.weight.data.mul_(-1)
    lin.weight.data.mul_(2)
    with torch.no_grad():
        assert_close(bn(x), plain_bn(bn, IN[0], 0.1).eval()(x))
        assert_close(lin(f), F.linear(f, lin.weight[:, :IN[0]], lin.bias))
        bn.load_state_dict({n: t + 1 for n, t in bn.state_dict().items()})
        assert_close(bn(x), plain_bn(bn, IN[0], 0.1).eval()(x))


def test_conv_cached_slice_follows_optimizer_steps(device, gen):
    ds = ds_conv(gen, device, 1, 1, False)
    opt = torch.optim.SGD(ds.parameters(), lr=0.5, momentum=0.9)
    x = randn_on(gen, 2, IN[1], 4, 4, device=device)
    for _ in range(2):
        with torch.no_grad():
            ds(x, 0)
        ds(x, 0).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            assert_close(ds(x, 0), plain_conv(ds, IN[1], OUT[0])(x))


def test_conv_cached_slice_follows_dtype_moves(device, gen):
    ds = ds_conv(gen, device, 3, 1, False).eval()
    x = randn_on(gen, 1, IN[0], 5, 5, device=device)
    with torch.no_grad():
        ds(x, 0)
        ds.double()
        assert not ds.slice_cache.entries  # the float32 slices (and their storage) are let go
        y = ds(x.double(), 0)
    assert y.dtype == torch.float64
    assert_close(y, plain_conv(ds, IN[0], OUT[0]).double()(x.double()))
