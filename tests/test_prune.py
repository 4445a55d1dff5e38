"""Channel spaces (dsnet.prune): each space is as wide, at the target route, as the convs writing it."""
from __future__ import annotations

import pytest
import timm
import torch

from dsnet.layers import DSConv2d
from dsnet.prune.channels import channel_spaces


@pytest.mark.parametrize("name", ("ds_resnet20", "ds_mobilenet_v1"))
@torch.no_grad()
def test_every_channel_space_is_as_wide_as_its_writers_at_the_route(name):
    model = timm.create_model(name).eval()
    out = {}
    hooks = [m.register_forward_hook(lambda m, args, y: out.__setitem__(id(m.weight), y.shape[1]))
             for m in model.modules() if isinstance(m, DSConv2d)]
    x = torch.randn(1, 3, 32, 32)
    try:
        for subnet in (0, model.num_subnets - 1):
            out.clear()
            model(x, subnet=subnet)
            for space in channel_spaces(model, subnet):
                assert space.writers and all(out[id(w)] == space.width for w in space.writers)
    finally:
        for h in hooks:
            h.remove()
