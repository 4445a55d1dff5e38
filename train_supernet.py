#!/usr/bin/env python
"""Stage one: train a slice-able supernet with In-place Ensemble Bootstrapping.

    python train_supernet.py -c configs/quickstart.yml [section.key=value ...]

The same as the installed command ``dsnet train-supernet``.
"""
import sys

from dsnet.cli import train_supernet_main

if __name__ == "__main__":
    sys.exit(train_supernet_main())
