"""Static subnet extraction: a supernet route as a plain torch.nn model."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from dsnet.madds import _route
from dsnet.models.net import DSNet

__all__ = ["extract_subnet"]


def extract_subnet(model: DSNet, subnet: int | str | Sequence[int] | None = None) -> nn.Module:
    """A dense copy of ``subnet`` (index, "largest" or route) built from torch.nn layers only.

    It holds the sliced weights and that width's BN statistics, so in eval mode it returns what
    ``model(x, subnet=subnet)`` returns. The copy shares no storage with the supernet.
    """
    return model.extract(_route(model, subnet))
