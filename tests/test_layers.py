"""Each slice-able layer at each width equals a plain torch.nn layer holding the sliced weights."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from dsnet.layers import DSBatchNorm2d, DSConv2d, DSGate, DSLinear, SqueezeExcite

IN, OUT = (8, 16), (12, 24)  # different in/out lists catch a swapped slice


def randn_on(g, *shape, device):
    return torch.randn(*shape, generator=g).to(device)


def ds_conv(g, device, kernel, stride, bias, depthwise=False):
    out = IN if depthwise else OUT
    conv = DSConv2d(IN, out, kernel, stride, depthwise=depthwise, bias=bias).to(device)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        if bias:
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g))
    return conv


def plain_conv(ds: DSConv2d, in_c: int, out_c: int) -> nn.Conv2d:
    """The reference: an nn.Conv2d built by hand from the leading weight slice."""
    k, s = ds.kernel_size[0], ds.stride[0]
    conv = nn.Conv2d(in_c, out_c, k, s, k // 2, groups=in_c if ds.depthwise else 1,
                     bias=ds.bias is not None).to(ds.weight.device)
    with torch.no_grad():
        conv.weight.copy_(ds.weight[:out_c] if ds.depthwise else ds.weight[:out_c, :in_c])
        if ds.bias is not None:
            conv.bias.copy_(ds.bias[:out_c])
    return conv


CONV_KINDS = {  # name: (kernel, stride, depthwise)
    "regular3x3": (3, 1, False), "regular3x3_s2": (3, 2, False), "pointwise": (1, 1, False),
    "depthwise3x3": (3, 1, True), "depthwise3x3_s2": (3, 2, True)}
# (input choice, output choice): a depthwise conv's output width is its input width
CONV_CASES = [(kind, i, i if CONV_KINDS[kind][2] else k)
              for kind in CONV_KINDS for i in (0, 1) for k in ((i,) if CONV_KINDS[kind][2] else (0, 1))]
# batch 1 and pooled [B, C, 1, 1] inputs take other kernels for strided 1x1 slices
INPUT_SHAPES = [(2, 9, 9), (1, 9, 9), (3, 1, 1)]


@pytest.mark.parametrize("kind,i_in,k", CONV_CASES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", INPUT_SHAPES)
def test_conv_slice_equals_plain_conv(device, gen, kind, i_in, k, bias, shape):
    kernel, stride, depthwise = CONV_KINDS[kind]
    ds = ds_conv(gen, device, kernel, stride, bias, depthwise)
    in_c = IN[i_in]
    out_c = in_c if depthwise else OUT[k]
    x = randn_on(gen, shape[0], in_c, *shape[1:], device=device)
    plain = plain_conv(ds, in_c, out_c)
    expected = plain(x)
    assert expected.shape[1] == out_c
    assert_close(ds(x, k), expected)                   # grad-enabled path (fresh slices)
    with torch.no_grad():
        assert_close(ds(x, k), expected)               # no-grad path (cached views)
        assert_close(ds.dense(in_c, out_c)(x), expected)
    with torch.inference_mode():
        assert_close(ds(x, k), expected)
    dense = ds.dense(in_c, out_c)
    assert type(dense) is nn.Conv2d and dense.weight.data_ptr() != ds.weight.data_ptr()


def plain_bn(ds: DSBatchNorm2d, c: int, momentum) -> nn.BatchNorm2d:
    k = ds.choices.index(c)
    bn = nn.BatchNorm2d(c, eps=ds.eps, momentum=momentum).to(ds.weight.device)
    with torch.no_grad():
        bn.weight.copy_(ds.weight[:c])
        bn.bias.copy_(ds.bias[:c])
        bn.running_mean.copy_(ds.running_mean[k, :c])
        bn.running_var.copy_(ds.running_var[k, :c])
        bn.num_batches_tracked.copy_(ds.num_batches_tracked[k])
    return bn


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("c", IN)
@pytest.mark.parametrize("grad", [True, False])  # training; BN recalibration under no_grad
def test_bn_train_updates_only_its_width_row(device, gen, randomize_bn, momentum, c, grad):
    ds = randomize_bn(DSBatchNorm2d(IN, momentum=momentum).to(device), gen)
    with torch.no_grad():
        ds.num_batches_tracked.copy_(torch.tensor([3, 5, 7]))
        ds(randn_on(gen, 1, c, 2, 2, device=device))  # eval first: any cached views must not go stale
    k = ds.choices.index(c)
    plain = plain_bn(ds, c, momentum)
    before = {n: b.clone() for n, b in ds.named_buffers()}
    for _ in range(2):
        x = randn_on(gen, 4, c, 5, 5, device=device) * 2 + 1
        with torch.set_grad_enabled(grad):
            assert_close(ds.train()(x), plain.train()(x))
    assert_close(ds.running_mean[k, :c], plain.running_mean)
    assert_close(ds.running_var[k, :c], plain.running_var)
    assert not torch.equal(ds.running_mean[k, :c], before["running_mean"][k, :c])
    for name in ("running_mean", "running_var"):
        untouched = torch.ones_like(before[name], dtype=torch.bool)
        untouched[k, :c] = False
        assert torch.equal(getattr(ds, name)[untouched], before[name][untouched]), name
    expected_count = before["num_batches_tracked"].clone()
    expected_count[k] += 2
    assert torch.equal(ds.num_batches_tracked, expected_count)
    assert int(plain.num_batches_tracked) == int(expected_count[k])


@pytest.mark.parametrize("c", IN)
def test_bn_eval_uses_its_width_stats(device, gen, randomize_bn, c):
    ds = randomize_bn(DSBatchNorm2d(IN).to(device), gen).eval()
    assert not torch.equal(ds.running_mean[0, :IN[0]], ds.running_mean[1, :IN[0]])
    x = randn_on(gen, 2, c, 5, 5, device=device)
    expected = plain_bn(ds, c, 0.1).eval()(x)
    assert_close(ds(x), expected)
    with torch.inference_mode():
        assert_close(ds(x), expected)
    dense = ds.dense(c).eval()
    assert type(dense) is nn.BatchNorm2d
    assert_close(dense(x), expected)
    with pytest.raises(ValueError, match=r"got 10 channels.*\[8, 16\]"):
        ds(randn_on(gen, 2, 10, 5, 5, device=device))


@pytest.mark.parametrize("in_f", [5, 16])
def test_linear_slice_equals_plain_linear(device, gen, in_f):
    ds = DSLinear(16, 7).to(device)
    x = randn_on(gen, 3, in_f, device=device)
    plain = nn.Linear(in_f, 7).to(device)
    with torch.no_grad():
        plain.weight.copy_(ds.weight[:, :in_f])
        plain.bias.copy_(ds.bias)
    assert_close(ds(x), plain(x))
    dense = ds.dense(in_f)
    assert type(dense) is nn.Linear
    assert_close(dense(x), plain(x))


@pytest.mark.parametrize("c", IN)
def test_squeeze_excite_and_gate_equal_their_dense_twins(device, gen, c):
    se = SqueezeExcite(IN).to(device)
    gate = DSGate(IN, num_routes=3).to(device)
    for m in (se, gate):
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
    x = randn_on(gen, 2, c, 6, 6, device=device)
    for m in (se, gate):
        r, e = m.reduce, m.expand  # reference written with F.conv2d on the leading slices
        h = F.relu(F.conv2d(x.mean((2, 3), keepdim=True), r.weight[:, :c], r.bias))
        expected = x * torch.sigmoid(F.conv2d(h, e.weight[:c], e.bias[:c]))
        assert_close(m(x), expected)
        assert_close(m.dense(c)(x), expected)
    attended, logits = gate.forward_gate(x)
    assert_close(attended, gate(x))
    h = F.relu(gate.reduce(x.mean((2, 3), keepdim=True))).flatten(1)
    assert_close(logits, gate.width_head(h))
    assert logits.shape == (2, 3)


@pytest.mark.parametrize("depthwise", [False, True])
def test_conv_gradient_reaches_only_the_slice(device, gen, depthwise):
    ds = ds_conv(gen, device, 3, 1, True, depthwise)
    in_c, k = IN[0], 0
    out_c = in_c if depthwise else OUT[k]
    plain = plain_conv(ds, in_c, out_c)
    x = randn_on(gen, 2, in_c, 6, 6, device=device)
    w = randn_on(gen, 2, out_c, 6, 6, device=device)
    (ds.eval()(x, k) * w).sum().backward()
    (plain(x) * w).sum().backward()
    region = (slice(None, out_c),) if depthwise else (slice(None, out_c), slice(None, in_c))
    assert_close(ds.weight.grad[region], plain.weight.grad)
    assert_close(ds.bias.grad[:out_c], plain.bias.grad)
    outside = torch.ones_like(ds.weight, dtype=torch.bool)
    outside[region] = False
    assert outside.any() and not ds.weight.grad[outside].any()
    assert not ds.bias.grad[out_c:].any()


def test_frozen_conv_passes_gradient_to_its_input(device, gen):
    """Stage two freezes the supernet (cached slices) and trains the gate upstream of it."""
    ds = ds_conv(gen, device, 3, 1, False).eval().requires_grad_(False)
    plain = plain_conv(ds, IN[0], OUT[0])
    x = randn_on(gen, 2, IN[0], 5, 5, device=device)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ds(x1, 0).sum().backward()
    plain(x2).sum().backward()
    assert_close(x1.grad, x2.grad)


def test_bn_largest_route_has_its_own_row(device, gen, randomize_bn):
    """The largest route reaches a layer's widest width like the widest static subnet, from other
    inputs: it updates and reads the extra last row, never the widest choice's row."""
    ds = randomize_bn(DSBatchNorm2d(IN).to(device), gen).train()
    before = ds.running_mean.clone()
    ds(randn_on(gen, 4, IN[-1], 3, 3, device=device) + 5, largest=True)
    changed = (ds.running_mean != before).any(1).tolist()
    assert changed == [False] * len(IN) + [True]
    ds.eval()
    x = randn_on(gen, 2, IN[-1], 3, 3, device=device)
    assert not torch.allclose(ds(x, largest=True), ds(x))
    assert_close(ds.dense(IN[-1], largest=True).eval()(x), ds(x, largest=True))
