"""Unreadable image files found before a run starts, without decoding a whole dataset each time.

``unreadable(root, paths)`` reads two small pieces of every file, the first 16 bytes and the last
1 KiB, and checks them against its format: JPEG ends with its end-of-image marker, PNG with its
IEND chunk, GIF with its trailer; a BMP or WebP file is as long as its header says. A file that
fails (truncated, empty) or has another format (TIFF, PPM, ...) is then decoded in full with PIL,
as the loader would, so only a file PIL cannot read is reported: the cheap check decides which
files need the expensive one. A file damaged in its middle passes and is found by the loader
when it reads it (``data.skip_bad_images``).

What was checked is recorded per folder in the user's cache (``$DSNET_CACHE_DIR``, else
``$XDG_CACHE_HOME/dsnet``, else ``~/.cache/dsnet``), keyed by the names, sizes and modification
times of the folder's files: a later start costs one ``stat`` per file, and a folder whose files
changed is checked again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image

__all__ = ["unreadable", "cache_dir", "TAIL_BYTES"]

logger = logging.getLogger(__name__)

TAIL_BYTES = 1024
_PADDING = b"\x00\r\n \t"  # what some writers leave after an image's last marker
_RECORD_VERSION = 1


def cache_dir() -> Path:
    """Where the records of checked folders are kept."""
    if os.environ.get("DSNET_CACHE_DIR"):
        return Path(os.environ["DSNET_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dsnet"


def _looks_whole(head: bytes, tail: bytes, size: int) -> str | None:
    """None when the first and last bytes of a file of ``size`` bytes are those of a whole image,
    else what is wrong with them ("" for a format without a cheap check)."""
    end = tail.rstrip(_PADDING)
    if head.startswith(b"\xff\xd8\xff"):
        return None if end.endswith(b"\xff\xd9") else "no JPEG end marker"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return None if end.endswith(b"IEND\xaeB`\x82") else "no PNG IEND chunk"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return None if end.endswith(b";") else "no GIF trailer"
    if head.startswith(b"BM") and len(head) >= 6:
        declared = int.from_bytes(head[2:6], "little")
        return None if 0 < declared <= size else f"BMP header says {declared} bytes, the file has {size}"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        declared = int.from_bytes(head[4:8], "little") + 8
        return None if declared <= size else f"WebP header says {declared} bytes, the file has {size}"
    return "empty file" if size == 0 else ""  # another format (TIFF, PPM, ...): decoded in full


def _decodes(path: str) -> str | None:
    """None when PIL decodes the whole image, else its complaint."""
    try:
        with Image.open(path) as img:
            img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def _inspect(path: str, size: int) -> str | None:
    """None for a readable image, else why it is not: the cheap check, confirmed by a decode."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            f.seek(max(0, size - TAIL_BYTES))
            tail = f.read()
    except OSError as err:
        return f"cannot be opened: {err.strerror or err}"
    suspicion = _looks_whole(head, tail, size)
    if suspicion is None:
        return None
    complaint = _decodes(path)
    return complaint if complaint is None or not suspicion else f"{suspicion}; {complaint}"


def _listing(folder: str, names: Sequence[str]) -> tuple[str, list[int]]:
    """(digest of the names, sizes and modification times of ``names`` in ``folder``, sizes)."""
    digest, sizes = hashlib.sha1(), []
    for name in names:
        st = os.stat(os.path.join(folder, name))
        digest.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        sizes.append(st.st_size)
    return digest.hexdigest(), sizes


def _record_path(root: Path) -> Path:
    key = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    return cache_dir() / f"checked-images-{key}.json"


def _read_record(path: Path, root: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    ok = isinstance(record, dict) and record.get("version") == _RECORD_VERSION and record.get("root") == str(root)
    return record.get("folders", {}) if ok else {}


def _write_record(path: Path, root: Path, folders: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"version": _RECORD_VERSION, "root": str(root), "folders": folders}))
        os.replace(tmp, path)
    except OSError as err:
        logger.info("could not record the checked images in %s (%s); the next start checks them again",
                    path, err.strerror or err)


def _by_folder(paths: Iterable[str]) -> dict[str, list[str]]:
    folders: dict[str, list[str]] = {}
    for path in paths:
        folder, name = os.path.split(path)
        folders.setdefault(folder, []).append(name)
    return folders


def unreadable(root: str | os.PathLike, paths: Iterable[str], workers: int = 8) -> dict[str, str]:
    """The image files among ``paths`` (all under ``root``) that cannot be read, each with why:
    checked cheaply, confirmed by a decode, and recorded per folder so that a folder whose files
    are unchanged is not read again (see the module's docstring). ``workers`` threads read files."""
    root = Path(root).resolve()
    record_path = _record_path(root)
    record = _read_record(record_path, root)
    folders = _by_folder(paths)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        listings = dict(zip(folders, pool.map(lambda f: _listing(f, folders[f]), folders)))
        stale = [f for f in folders if record.get(os.path.relpath(f, root), {}).get("digest") != listings[f][0]]
        if stale:
            count, start = sum(len(folders[f]) for f in stale), time.perf_counter()
            logger.info("checking %d images in %d folders of %s for unreadable files (recorded in %s for the "
                        "next start)", count, len(stale), root, record_path)
            jobs = [(f, name, size) for f in stale for name, size in zip(folders[f], listings[f][1])]
            found = pool.map(lambda job: _inspect(os.path.join(job[0], job[1]), job[2]), jobs)
            bad_in: dict[str, dict[str, str]] = {f: {} for f in stale}
            for (folder, name, _), why in zip(jobs, found):
                if why is not None:
                    bad_in[folder][name] = why
            for folder in stale:
                record[os.path.relpath(folder, root)] = {"digest": listings[folder][0], "bad": bad_in[folder]}
            logger.info("checked %d images in %.1f s", count, time.perf_counter() - start)
            _write_record(record_path, root, record)
    return {os.path.join(f, name): why for f in folders
            for name, why in record[os.path.relpath(f, root)]["bad"].items()}
