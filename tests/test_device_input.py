"""The GPU input path (``data.normalize_on``): workers stop at uint8, the device normalises and
erases. Run here with device=cpu: the batches must equal the float path's, loader by loader."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from dsnet.config import ConfigError, load_config
from dsnet.data import (DataError, DeviceLoader, DeviceTransforms, SyntheticImages, build_dataset, build_loader,
                        build_transforms, default_normalization, normalizes_on_device)
from dsnet.train import runs
from dsnet.train.engine import Runtime
from dsnet.train.runs import build_data

CPU = torch.device("cpu")
AUGMENT = "rand-m9-mstd0.5"  # the ImageNet config's RandAugment: the crops and ops must line up too


def _jpegs(root, sizes=((50, 37), (80, 61), (37, 50), (64, 64)), classes=("cat", "dog")) -> None:
    """Real JPEG files of several sizes and aspect ratios (synthetic images, upscaled, re-encoded)."""
    synthetic = SyntheticImages(len(sizes) * len(classes), image_size=32, seed=5)
    for split in ("train", "val"):
        for c, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True)
            for k, size in enumerate(sizes):
                image = synthetic[c * len(sizes) + k][0].resize(size, Image.BILINEAR)
                image.save(root / split / cls / f"{k}.jpg", quality=90)


def _dataset(source: str, root, size: int, training: bool, uint8: bool):
    tf = build_transforms(size, training, auto_augment=AUGMENT if training else None, uint8=uint8)
    if source == "synthetic":
        return SyntheticImages(12, image_size=size, seed=2, transform=tf)
    return build_dataset("folder", root, "train", tf)


def _seeded_pass(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every batch of ``loader``, the global streams (which num_workers=0 augments from) seeded."""
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    return list(loader)


@pytest.mark.parametrize("size", [32, 224])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("source", ["jpeg", "synthetic"])
def test_uint8_workers_and_device_normalisation_give_the_float_path_batches(tmp_path, source, size, training):
    _jpegs(tmp_path)
    mean, std = default_normalization(size)
    float_loader = build_loader(_dataset(source, tmp_path, size, training, False), 4, training, seed=3)
    device_loader = build_loader(_dataset(source, tmp_path, size, training, True), 4, training, seed=3,
                                 on_device=DeviceTransforms(CPU, mean, std))
    assert isinstance(device_loader, DeviceLoader)
    assert device_loader.dataset[0][0].dtype == torch.uint8  # the workers' images: uint8 ...
    expected, got = _seeded_pass(float_loader), _seeded_pass(device_loader)
    assert len(got) == len(expected) == len(float_loader) == len(device_loader) > 1
    for (x, y), (gx, gy) in zip(expected, got):
        assert gx.dtype == torch.float32 and gx.shape == x.shape == (4, 3, size, size)
        torch.testing.assert_close(gx, x)  # ... and what the model sees: the float path's tensors
        assert torch.equal(gy, y)


def _data(tmp_path, normalize_on: str, size: int):
    overrides = ["data.name=folder", f"data.root={tmp_path}", f"data.input_size={size}", "data.num_workers=0",
                 "train.batch_size=4", f"data.auto_augment={AUGMENT}", f"data.normalize_on={normalize_on}"]
    return build_data(load_config(None, overrides), Runtime(CPU), holdout=0.25)


@pytest.mark.parametrize("size", [32, 224])
def test_every_loader_of_a_run_serves_the_float_path_batches_on_the_device_path(tmp_path, size):
    """Training, validation (also what evaluate, bench and export read), calibration and holdout."""
    _jpegs(tmp_path)
    floats, device = _data(tmp_path, "workers", size), _data(tmp_path, "device", size)
    for name in ("train", "val", "calib", "holdout"):
        a, b = getattr(floats, name), getattr(device, name)
        assert isinstance(b, DeviceLoader) and not isinstance(a, DeviceLoader), name
        assert (len(b), b.batch_size, b.drop_last, type(b.sampler)) == (len(a), a.batch_size, a.drop_last,
                                                                        type(a.sampler)), name
        assert b.generator is b.loader.generator and b.dataset is b.loader.dataset, name
        for loader in (a, b):  # as the training loop reseeds the order each epoch
            loader.generator.manual_seed(42)
        (x, y), (gx, gy) = _seeded_pass(a)[0], _seeded_pass(b)[0]
        torch.testing.assert_close(gx, x, msg=name)
        assert torch.equal(gy, y), name
    assert device.calib.dataset is device.train.dataset


def _erasing_loader(reprob: float, seed: int = 0) -> DeviceLoader:
    data = SyntheticImages(16, image_size=32, seed=1, transform=build_transforms(32, False, uint8=True))
    mean, std = default_normalization(32)
    # in order (is_training=False), so that a change between epochs is the erasing's own
    return build_loader(data, 8, False, seed=seed, on_device=DeviceTransforms(CPU, mean, std, reprob))


def _epoch(loader: DeviceLoader, epoch_seed: int) -> torch.Tensor:
    loader.generator.manual_seed(epoch_seed)
    return torch.cat([x for x, _ in loader])


def test_device_erasing_follows_the_loader_generator_and_leaves_the_global_streams_alone():
    before = random.getstate(), torch.get_rng_state()
    loader = _erasing_loader(1.0)
    plain, erased = _epoch(_erasing_loader(0.0), 5), _epoch(loader, 5)
    changed = (plain != erased).flatten(1).any(1)
    assert changed.all()  # reprob=1: every image has a box
    assert ((plain != erased).flatten(1).float().mean(1) < 0.5).all()  # a box, not the whole image
    again = _epoch(loader, 5)
    assert random.getstate() == before[0] and torch.equal(torch.get_rng_state(), before[1])
    torch.testing.assert_close(again, erased, rtol=0, atol=0)  # a resumed epoch erases alike
    other_epoch = _epoch(loader, 6)
    assert torch.equal(_epoch(_erasing_loader(0.0), 6), plain)
    assert ((other_epoch != plain) != (erased != plain)).flatten(1).any(1).all()  # each epoch: new boxes


def test_a_run_on_cuda_builds_uint8_datasets_under_auto():
    """What decides the path is the runtime's device: no CUDA call is made to build the datasets."""
    for device, normalize_on, dtype in ((torch.device("cuda", 0), "auto", torch.uint8), (CPU, "auto", torch.float32),
                                        (torch.device("cuda", 0), "workers", torch.float32)):
        cfg = load_config(None, ["data.synthetic_val_size=4", f"data.normalize_on={normalize_on}"])
        assert runs._datasets(cfg, Runtime(device), "val", False)[0][0].dtype == dtype, (device, normalize_on)


def test_auto_takes_the_device_path_on_cuda_only():
    assert normalizes_on_device("auto", torch.device("cuda", 0)) is True
    assert normalizes_on_device("auto", CPU) is False
    assert normalizes_on_device("device", CPU) is True
    assert normalizes_on_device("workers", torch.device("cuda")) is False
    assert load_config(None, []).data.normalize_on == "auto"
    with pytest.raises(ConfigError, match=r"^data\.normalize_on must be one of auto, device, workers, got 'gpu'$"):
        load_config(None, ["data.normalize_on=gpu"])


def test_float_images_on_the_device_path_are_refused():
    data = SyntheticImages(4, image_size=32, transform=build_transforms(32, False))
    loader = build_loader(data, 2, False, on_device=DeviceTransforms(CPU, (0.5,) * 3, (0.5,) * 3))
    with pytest.raises(DataError, match=r"^the GPU input path \(data\.normalize_on\) needs uint8 image tensors "
                                        r"from the dataset \(build_transforms\(\.\.\., uint8=True\)\), "
                                        r"got torch\.float32$"):
        next(iter(loader))
