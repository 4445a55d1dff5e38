"""Unreadable images are found before any work (``dsnet.imagecheck``, ``ImageFolderDataset.check_files``):
a truncated JPEG stops a training command with one sentence naming it and exit 2 before the run
directory exists, or is left out with ``data.skip_bad_images=true``; whole images in every format
pass (trailing padding included), and a second start reads no file of an unchanged folder."""
import io
import logging
import os

import numpy as np
import pytest
from PIL import Image

from dsnet import imagecheck
from dsnet.cli import main as dsnet_main
from dsnet.config import config_yaml, load_config
from dsnet.data import build_dataset
from tests.test_runs import TINY


def _image(path, fmt="JPEG", color=(200, 40, 10), size=(48, 36)):
    """An image of ``color`` with seeded noise (so that a JPEG has a real scan to cut)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(sum(color)).integers(0, 60, (size[1], size[0], 3))
    Image.fromarray((np.array(color) * 0.7 + noise).astype("uint8")).save(path, fmt)
    return path


def _folder(root, per_class=4):
    for split in ("train", "val"):
        for c, cls in enumerate(("cat", "dog")):
            for k in range(per_class):
                _image(root / split / cls / f"{k}.jpg", color=(60 * c, 30 * k, 90))


def _truncate(path) -> str:
    """Cut the last quarter of ``path``; returns what PIL says when the loader reads it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 4])
    with pytest.raises(OSError, match="(?i)truncated") as err:  # what the loader would meet hours in
        with Image.open(path) as img:
            img.convert("RGB")
    return str(err.value)


def test_a_truncated_jpeg_stops_training_before_the_run_directory_exists(tmp_path, capsys):
    _folder(tmp_path / "data", per_class=8)  # one batch of 16: today the loader meets the file in training
    bad = tmp_path / "data" / "train" / "dog" / "2.jpg"
    why = _truncate(bad)
    config = tmp_path / "tiny.yml"
    config.write_text(config_yaml(load_config(None, TINY)))
    out = tmp_path / "run"
    code = dsnet_main(["train-supernet", "-c", str(config), "data.name=folder", f"data.root={tmp_path / 'data'}",
                       f"output.dir={out}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists()
    assert err == (f"dsnet train-supernet: error: 1 unreadable image under '{tmp_path / 'data' / 'train'}': {bad} "
                   f"(no JPEG end marker; OSError: {why}); fix or remove "
                   f"it, or set data.skip_bad_images=true to leave it out")


def test_skip_bad_images_leaves_the_unreadable_ones_out_before_training(tmp_path, caplog):
    _folder(tmp_path)
    _truncate(tmp_path / "train" / "dog" / "2.jpg")
    (tmp_path / "train" / "cat" / "0.jpg").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="dsnet.data"):
        data = build_dataset("folder", tmp_path, "train", skip_bad_images=True, check_files=True)
    assert [os.path.relpath(p, tmp_path) for p, _ in data.samples] == [
        "train/cat/1.jpg", "train/cat/2.jpg", "train/cat/3.jpg", "train/dog/0.jpg", "train/dog/1.jpg",
        "train/dog/3.jpg"]
    assert data.targets == [0, 0, 0, 1, 1, 1]
    assert "left out 2 unreadable images" in caplog.text
    assert len(build_dataset("folder", tmp_path, "train", skip_bad_images=True)) == 8  # unchecked: as listed


@pytest.mark.parametrize("fmt,suffix", [("JPEG", "jpg"), ("PNG", "png"), ("GIF", "gif"), ("BMP", "bmp"),
                                        ("WEBP", "webp"), ("TIFF", "tif"), ("PPM", "ppm")])
def test_whole_images_pass_and_cut_ones_are_named_in_every_format(tmp_path, fmt, suffix):
    whole = _image(tmp_path / "c" / f"whole.{suffix}", fmt, size=(40, 30))
    padded = _image(tmp_path / "c" / f"padded.{suffix}", fmt, size=(40, 30))
    padded.write_bytes(padded.read_bytes() + b"\0" * 2000)  # some writers pad after the last marker
    cut = _image(tmp_path / "c" / f"cut.{suffix}", fmt, size=(40, 30))
    cut.write_bytes(cut.read_bytes()[:-40])
    bad = imagecheck.unreadable(tmp_path, [str(whole), str(padded), str(cut)])
    assert list(bad) == [str(cut)], bad


def test_a_second_start_reads_no_file_of_an_unchanged_folder(tmp_path, monkeypatch):
    _folder(tmp_path)
    _truncate(tmp_path / "train" / "dog" / "2.jpg")
    paths = sorted(str(p) for p in (tmp_path / "train").rglob("*.jpg"))
    first = imagecheck.unreadable(tmp_path / "train", paths)
    assert list(first) == [str(tmp_path / "train" / "dog" / "2.jpg")]
    opened = []
    real = imagecheck._inspect
    monkeypatch.setattr(imagecheck, "_inspect", lambda path, size: opened.append(path) or real(path, size))
    assert imagecheck.unreadable(tmp_path / "train", paths) == first and opened == []
    cat = tmp_path / "train" / "cat" / "1.jpg"
    buffer = io.BytesIO()
    Image.new("RGB", (12, 10), (1, 2, 3)).save(buffer, "JPEG")
    cat.write_bytes(buffer.getvalue()[:-2])  # rewritten, without its end marker
    again = imagecheck.unreadable(tmp_path / "train", paths)
    assert sorted(again) == [str(cat), str(tmp_path / "train" / "dog" / "2.jpg")]
    assert sorted(opened) == sorted(p for p in paths if "/cat/" in p)  # only the changed folder is read again
