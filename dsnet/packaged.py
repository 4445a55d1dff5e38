"""The configs that ship with dsnet, so ``-c configs/quickstart.yml`` works from any directory.

The repository's ``configs/`` folder is installed as ``dsnet/configs`` (setup.cfg maps the package
``dsnet.configs`` to it). ``load_config`` reads a path that exists as given; only when it does not
exist and names a shipped config (``configs/quickstart.yml``, ``quickstart.yml`` or
``quickstart``) does it read the packaged file instead.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["packaged_dir", "packaged_names", "packaged_config"]

_SUFFIX = ".yml"


def packaged_dir() -> Path | None:
    """The folder of the shipped configs: ``dsnet/configs`` in a regular install, the checkout's
    ``configs/`` when dsnet is imported from a source tree (editable install, ``PYTHONPATH``)."""
    package = Path(__file__).resolve().parent
    checkout = package.parent
    if (package / "configs").is_dir():
        return package / "configs"
    if (checkout / "setup.cfg").is_file() and (checkout / "configs").is_dir():
        return checkout / "configs"
    return None


def packaged_names() -> list[str]:
    """The shipped config names without ``.yml``, sorted: ``["cifar10_ds_resnet20", ..., "quickstart"]``."""
    folder = packaged_dir()
    return sorted(p.stem for p in folder.glob(f"*{_SUFFIX}")) if folder else []


def packaged_config(path: str | os.PathLike) -> Path | None:
    """The shipped file that the missing relative ``path`` names, or None. ``configs/NAME.yml``,
    ``NAME.yml`` and ``NAME`` name it; a path in any other folder names none."""
    given = Path(path)
    if given.parent not in (Path("."), Path("configs")):
        return None
    stem = given.name[: -len(_SUFFIX)] if given.name.endswith(_SUFFIX) else given.name
    if stem not in packaged_names():
        return None
    return packaged_dir() / f"{stem}{_SUFFIX}"
