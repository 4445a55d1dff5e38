"""The gate's width head (head B of the double-headed gate): what stage two trains.

``fc`` is the published head (one linear layer over the gate's hidden features); ``mlp`` adds a
hidden layer with dropout (``gate.head=mlp``). Every head starts at zero logits, so a new gate
finds every route equally likely.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from dsnet.config import HEADS

__all__ = ["HEADS", "MLPHead", "head_output", "width_head", "head_cost"]




class MLPHead(nn.Module):
    """The gate's width head as a 2-layer MLP: FC -> ReLU -> dropout -> FC (``gate.head=mlp``)."""

    def __init__(self, in_features: int, out_features: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(in_features, hidden), nn.Dropout(dropout), nn.Linear(hidden, out_features)
        self.in_features, self.out_features, self.hidden, self.dropout = in_features, out_features, hidden, dropout

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, in_features] -> route logits [B, out_features]."""
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def head_output(head: nn.Module) -> nn.Linear:
    """The linear layer that produces a width head's logits (where a logit bias folds in)."""
    return head if isinstance(head, nn.Linear) else head.fc2


def width_head(kind: str, in_features: int, out_features: int, hidden: int = 64, dropout: float = 0.0) -> nn.Module:
    """A gate width head [B, in_features] -> route logits [B, out_features] that starts at zero
    logits (every route equally likely): ``fc`` (the published head) or ``mlp`` (``MLPHead``)."""
    if kind not in HEADS:
        raise ValueError(f"gate head must be one of {', '.join(HEADS)}, got {kind!r}")
    head = nn.Linear(in_features, out_features) if kind == "fc" else MLPHead(in_features, out_features, hidden, dropout)
    nn.init.zeros_(head_output(head).weight)
    nn.init.zeros_(head_output(head).bias)
    return head


def head_cost(head: nn.Module) -> tuple[int, int]:
    """(MAdds per sample, parameters) of a width head: its linear layers."""
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    return sum(m.in_features * m.out_features for m in linears), sum(p.numel() for p in head.parameters())
