#!/usr/bin/env python
"""Stage two: freeze a stage-one supernet and train its gates with Sandwich Gate Sparsification.

    python train_gate.py -c configs/quickstart.yml --supernet runs/quickstart/checkpoints/last.pth [section.key=value ...]

The same as the installed command ``dsnet train-gate``.
"""
import sys

from dsnet.cli import train_gate_main

if __name__ == "__main__":
    sys.exit(train_gate_main())
