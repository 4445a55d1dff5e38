"""Slice-able building blocks: layers that run any leading slice of their widest weights densely.

``slimmable`` holds the layers (``DSConv2d``, ``DSBatchNorm2d``, ``DSLinear``, squeeze-excite and the
gate), ``heads`` the gate's width heads, ``fastpath`` the slice cache behind their forward. This
package knows no model and no training: it imports ``dsnet.config`` and ``dsnet.errors`` only.
"""
from dsnet.layers.fastpath import clear_slice_caches
from dsnet.layers.slimmable import (DenseGate, DSBatchNorm2d, DSConv2d, DSGate, DSLinear, SqueezeExcite,
                                    SqueezeExciteDense, channel_attention, check_choices, gate_forward)

__all__ = ["DSConv2d", "DSBatchNorm2d", "DSLinear", "DSGate", "DenseGate", "SqueezeExcite", "SqueezeExciteDense",
           "channel_attention", "gate_forward", "check_choices", "clear_slice_caches"]
