"""The DS-Net release fixture: a seeded fill of the release's state dict and what the release's
own model code computed from it (``tests/fixtures/ds_net_release.json``: plain JSON, each
tensor as its dtype, shape and base64 bytes, so the repository holds data, not a pickle).

The fixture holds the release's key names and shapes, BN statistics the release measured along
three routes (float16; ``release_statistics`` derives every width's from them), and the release's logits on two fixed 64x64 images along the
largest route and each of the 14 static subnets. ``release_state_dict`` rebuilds the full state
dict from it. The fixture was recorded once, in a temporary checkout of the release run beside
dsnet (docs/results.md); no script that runs the release is kept here, and the tests never
need it.
"""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import torch

FIXTURE = Path(__file__).parent / "fixtures" / "ds_net_release.json"
LOSSES = Path(__file__).parent / "fixtures" / "ds_net_release_losses.json"
# The loss fixture scales these tensors of the seeded state dict: logits about 10x the seeded
# rule's (std ~3 instead of ~0.3, so the losses are far from log(num_classes) and a dropped
# smoothing or a wrong target shows) and gate logits 4x (the Gumbel sample depends on them, not
# only on the noise).
LOSS_SCALES = {"classifier.weight": 10.0, "classifier.bias": 10.0, "blocks.3.first_block.gate.gate.0.weight": 4.0}
_AUX = re.compile(r"^(.*)\.aux_bn\.(\d+)\.(running_mean|running_var|num_batches_tracked)$")


def fill_parameters(keys: list[tuple[str, tuple[int, ...]]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded values for every tensor but the BN statistics, in key order: convolutions and the
    classifier ~ N(0, 1/fan_in), BN scale U(0.5, 1.5), BN shift and biases U(-0.2, 0.2)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in keys:
        if _AUX.match(key):
            continue
        if key.endswith(".weight") and len(shape) in (2, 4):
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            out[key] = torch.randn(shape, generator=g) / fan_in ** 0.5
        elif key.endswith(".weight"):
            out[key] = torch.rand(shape, generator=g) + 0.5
        else:
            out[key] = torch.rand(shape, generator=g) * 0.4 - 0.2
    return out


def release_statistics(keys: list[tuple[str, tuple[int, ...]]], measured: dict[str, dict[str, torch.Tensor]],
                       seed: int = 1) -> dict[str, torch.Tensor]:
    """Every ``<bn>.aux_bn.<i>`` statistic from the measured ones: ``measured[route][bn]`` holds
    [2, width] (mean; var) of one BN as the release measured it along ``route``: "largest" (its
    widest BN), "slimmest" (BN 0) and "subnet_13" (the gated stages' widest BN on subnet 13's
    route). A BN's widest and narrowest widths take their measured values; a width in between
    takes the leading entries of subnet 13's, moved by a seeded amount (mean + 0.1 sd N(0, 1),
    var x U(0.8, 1.25)) so that a wrong width index shows."""
    g = torch.Generator().manual_seed(seed)
    counts: dict[str, int] = {}
    for key, _ in keys:
        hit = _AUX.match(key)
        if hit is not None:
            counts[hit.group(1)] = max(counts.get(hit.group(1), 0), int(hit.group(2)) + 1)
    out = {}
    for key, shape in keys:
        hit = _AUX.match(key)
        if hit is None:
            continue
        bn, i, what = hit.group(1), int(hit.group(2)), hit.group(3)
        if what == "num_batches_tracked":
            out[key] = torch.tensor(100, dtype=torch.long)
            continue
        row = 0 if what == "running_mean" else 1
        if i == counts[bn] - 1 or i == 0:
            out[key] = measured["largest" if i else "slimmest"][bn][row].float().clone()
            continue
        width = shape[0]
        mean, var = measured["subnet_13"][bn].float()[:, :width]
        if what == "running_mean":
            out[key] = mean + 0.1 * var.sqrt() * torch.randn(width, generator=g)
        else:
            out[key] = var * torch.exp(torch.rand(width, generator=g) * 0.446 - 0.223)
    return out


def _decode(node):
    if isinstance(node, dict) and "tensor" in node:
        data = bytearray(base64.b64decode(node["base64"]))
        return torch.frombuffer(data, dtype=getattr(torch, node["tensor"])).reshape(node["shape"]).clone()
    if isinstance(node, dict):
        return {k: _decode(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_decode(v) for v in node]
    return node


def load_fixture() -> dict:
    """The fixture with its tensors decoded (``keys`` as [name, shape] pairs)."""
    return _decode(json.loads(FIXTURE.read_text()))


def release_state_dict(fixture: dict) -> dict[str, torch.Tensor]:
    """The full release state dict the fixture's logits were computed from, in the release's key order."""
    keys = [(k, tuple(s)) for k, s in fixture["keys"]]
    values = {**fill_parameters(keys), **release_statistics(keys, fixture["measured"])}
    return {k: values[k] for k, _ in keys}


def fixture_input(size: int = 64) -> torch.Tensor:
    """The two images [2, 3, size, size] the fixture's logits were computed on."""
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(3)) * 2 - 1


def loss_state_dict(fixture: dict) -> dict[str, torch.Tensor]:
    """``release_state_dict`` with ``LOSS_SCALES`` applied: the weights the loss fixture was recorded with."""
    sd = release_state_dict(fixture)
    return {k: v * LOSS_SCALES[k] if k in LOSS_SCALES else v for k, v in sd.items()}


def load_losses() -> dict:
    """What the release's own training steps computed on one fixed batch
    (``tests/fixtures/ds_net_release_losses.json``: plain numbers, no tensors)."""
    return json.loads(LOSSES.read_text())


def loss_batch(losses: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch the losses were recorded on: images [B, 3, S, S] in [-1, 1] and labels [B]."""
    b = losses["batch"]
    g = torch.Generator().manual_seed(b["image_seed"])
    x = torch.rand(b["size"], 3, b["input_size"], b["input_size"], generator=g) * 2 - 1
    return x, torch.tensor(b["labels"])
