"""The ``dsnet`` console script (and ``python -m dsnet_console``): parse with the torch-free parser,
then run the command.

``dsnet --help``, ``dsnet COMMAND --help`` and usage errors exit in ``parse_args`` before torch
loads; only a command that will run imports ``dsnet.cli`` (and with it torch and timm). This
module sits above both: the parser (``dsnet_command``) imports nothing of dsnet, and ``dsnet.cli``
imports the parser, so the deferred import is there for start-up time, not to break a circle. It is
a module of its own, outside ``dsnet_command``, so that every import runs downward: console ->
``dsnet.cli`` -> parser.
"""
from __future__ import annotations

import importlib
import sys
from typing import Sequence

from dsnet_command import parse_args

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """``dsnet COMMAND ...``: parse (help and usage errors exit here), then run the command in
    ``dsnet.cli``; returns the exit status."""
    args = parse_args(argv)
    return importlib.import_module("dsnet.cli").run(args)


if __name__ == "__main__":
    sys.exit(main())
