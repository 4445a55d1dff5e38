"""Data: synthetic determinism and learnability, folders, clear errors, transforms, loaders."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from dsnet.data import (DataError, SyntheticImages, build_dataset, build_loader, build_mixup,
                        build_transforms)


def _tensor(ds, i: int) -> torch.Tensor:
    return pil_to_tensor(ds[i][0])


def test_synthetic_is_deterministic_per_seed_and_split():
    a, b = SyntheticImages(32, seed=3), SyntheticImages(32, seed=3)
    for i in range(32):
        torch.testing.assert_close(_tensor(a, i), _tensor(b, i))
        assert a[i][1] == b[i][1] == a.label(i)
    other_seed, val = SyntheticImages(32, seed=4), SyntheticImages(32, seed=3, split="val")
    for other in (other_seed, val):
        assert all(not torch.equal(_tensor(a, i), _tensor(other, i)) for i in range(32))
    assert a.classes == [f"class_{c}" for c in range(10)]
    img, label = a[0]
    assert img.size == (32, 32) and img.mode == "RGB" and isinstance(label, int)


def test_synthetic_sample_independent_of_access_order():
    ds = SyntheticImages(50, seed=1)
    forward = [_tensor(ds, i) for i in range(50)]
    fresh = SyntheticImages(50, seed=1)
    for i in reversed(range(50)):
        torch.testing.assert_close(_tensor(fresh, i), forward[i])
    torch.testing.assert_close(_tensor(ds, 17), forward[17])


def test_synthetic_difficulty_mix_sizes_and_bad_options():
    ds = SyntheticImages(1000, num_classes=5, image_size=48, easy_fraction=0.6)
    hard = sum(ds.difficulty(i) for i in range(1000)) / 1000
    assert 0.33 < hard < 0.47
    assert {ds.label(i) for i in range(1000)} == set(range(5))
    assert ds.render(0)[0].shape == (3, 48, 48)
    with pytest.raises(IndexError):
        ds[1000]
    with pytest.raises(DataError, match="num_classes"):
        SyntheticImages(10, num_classes=1)
    with pytest.raises(DataError, match="split 'test'"):
        SyntheticImages(10, split="test")


def _stack(ds: SyntheticImages) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images, labels = zip(*(ds.render(i) for i in range(len(ds))))
    hard = torch.tensor([ds.difficulty(i) for i in range(len(ds))], dtype=torch.bool)
    return (torch.stack(images) - 0.5) / 0.25, torch.tensor(labels), hard


def test_synthetic_classes_are_learnable_and_easy_beats_hard(device):
    torch.manual_seed(0)
    x, y, _ = _stack(SyntheticImages(2000, seed=0))
    xv, yv, hard = _stack(SyntheticImages(1000, seed=0, split="val"))
    x, y, xv, yv = x.to(device), y.to(device), xv.to(device), yv.to(device)
    w = 8
    model = nn.Sequential(nn.Conv2d(3, w, 3, 2, 1), nn.BatchNorm2d(w), nn.ReLU(),
                          nn.Conv2d(w, 2 * w, 3, 2, 1), nn.BatchNorm2d(2 * w), nn.ReLU(),
                          nn.Conv2d(2 * w, 4 * w, 3, 2, 1), nn.BatchNorm2d(4 * w), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, 10)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        idx = torch.randint(len(x), (64,), generator=gen).to(device)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.inference_mode():
        correct = (model(xv).argmax(1) == yv).float().cpu()
    easy_acc, hard_acc = correct[~hard].mean().item(), correct[hard].mean().item()
    assert easy_acc > 0.9, (easy_acc, hard_acc)
    assert hard_acc > 0.2, (easy_acc, hard_acc)          # chance is 0.1
    assert easy_acc - hard_acc > 0.2, (easy_acc, hard_acc)


def _png(path, color=(255, 0, 0), size=(8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _tree(root, splits=("train", "val"), classes=("cat", "dog"), per_class=2) -> None:
    for split in splits:
        for c, cls in enumerate(classes):
            for k in range(per_class):
                _png(root / split / cls / f"{k}.png", color=(60 * c, 20 * k, 0))


@pytest.mark.parametrize("val_name", ["val", "test"])
def test_folder_dataset_train_and_val_or_test(tmp_path, val_name):
    _tree(tmp_path, splits=("train", val_name))
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    train = build_dataset("folder", tmp_path, "train")
    val = build_dataset("folder", str(tmp_path), "val", transform=build_transforms(32, False))
    assert train.classes == val.classes == ["cat", "dog"]
    assert len(train) == len(val) == 4
    img, label = train[3]
    assert isinstance(img, Image.Image) and label == 1
    x, label = val[0]
    assert x.shape == (3, 32, 32) and label == 0


def test_folder_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=str(missing)):
        build_dataset("folder", missing, "train")
    with pytest.raises(DataError, match="needs a root"):
        build_dataset("folder", None, "train")
    _tree(tmp_path, splits=("train",))
    with pytest.raises(DataError, match=rf"{tmp_path / 'val'}.*folders: train"):
        build_dataset("folder", tmp_path, "val")
    (tmp_path / "train" / "emu").mkdir()
    with pytest.raises(DataError, match=str(tmp_path / "train" / "emu")):
        build_dataset("folder", tmp_path, "train")
    with pytest.raises(DataError, match="accepted: synthetic, folder, cifar10, cifar100"):
        build_dataset("imagenet", tmp_path, "train")
    with pytest.raises(DataError, match="split 'test'"):
        build_dataset("folder", tmp_path, "test")


def test_folder_class_mismatch_is_an_error(tmp_path):
    _tree(tmp_path / "a", splits=("train",), classes=("cat", "dog"))
    _tree(tmp_path / "a", splits=("val",), classes=("cat", "emu"))
    with pytest.raises(DataError, match=r"only in train: \['dog'\], only in val: \['emu'\]"):
        build_dataset("folder", tmp_path / "a", "train")


def test_cifar_missing_folder_names_path(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "cifar-10-batches-py")):
        build_dataset("cifar10", tmp_path, "train")
    with pytest.raises(DataError, match=str(tmp_path / "cifar-100-python")):
        build_dataset("cifar100", tmp_path, "val")


def test_corrupt_image_raises_or_is_skipped_with_count(tmp_path, caplog):
    _tree(tmp_path, splits=("train",), per_class=3)
    bad = tmp_path / "train" / "cat" / "1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    strict = build_dataset("folder", tmp_path, "train")
    assert strict[0][1] == 0
    with pytest.raises(DataError, match=str(bad)):
        strict[1]
    lenient = build_dataset("folder", tmp_path, "train", skip_bad_images=True)
    with caplog.at_level(logging.WARNING, logger="dsnet.data"):
        img, label = lenient[1]
        lenient[1]
    good = strict[2]
    assert label == good[1] and torch.equal(pil_to_tensor(img), pil_to_tensor(good[0]))
    assert lenient.num_skipped == 2
    assert "2 skipped so far" in caplog.text and str(bad) in caplog.text


@pytest.mark.parametrize("size", [32, 224])
@pytest.mark.parametrize("training", [True, False])
def test_transform_shapes(size, training):
    tf = build_transforms(size, training, auto_augment="rand-m9-mstd0.5" if training else None,
                          reprob=0.25 if training else 0.0)
    x = tf(Image.new("RGB", (40, 36), (10, 200, 30)))
    assert x.shape == (3, size, size) and x.dtype == torch.float32


def test_transform_errors_name_the_value():
    with pytest.raises(DataError, match="'bogus'"):
        build_transforms(32, True, auto_augment="bogus")
    with pytest.raises(DataError, match="'lanczos'"):
        build_transforms(32, False, interpolation="lanczos")


def test_loader_order_is_deterministic_with_a_seed():
    ds = SyntheticImages(40, seed=0, transform=build_transforms(32, False))

    def epochs(seed: int) -> list[list[int]]:
        loader = build_loader(ds, batch_size=8, is_training=True, num_workers=0, seed=seed)
        return [torch.cat([y for _, y in loader]).tolist() for _ in range(2)]

    first = epochs(0)
    assert first == epochs(0)
    assert first[0] != first[1] and first != epochs(1)
    eval_loader = build_loader(ds, batch_size=16, is_training=False, num_workers=0)
    assert [len(y) for _, y in eval_loader] == [16, 16, 8]
    assert torch.cat([y for _, y in eval_loader]).tolist() == [ds.label(i) for i in range(40)]
    with pytest.raises(DataError, match="torch.distributed"):
        build_loader(ds, 8, True, distributed=True)


def test_build_mixup():
    assert build_mixup(0.0, 0.0, 0.1, 10) is None
    mixup = build_mixup(0.8, 1.0, 0.1, 10)
    x, target = mixup(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    assert x.shape == (4, 3, 32, 32) and target.shape == (4, 10)
    torch.testing.assert_close(target.sum(1), torch.ones(4))


@pytest.mark.parametrize("length,world", [(37, 2), (5, 3), (2, 4), (0, 2)])
def test_evaluation_shards_hold_every_sample_exactly_once(length, world):
    from dsnet.data import ShardSampler

    shards = [list(ShardSampler(length, rank, world)) for rank in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(length))
    assert [len(ShardSampler(length, rank, world)) for rank in range(world)] == [len(s) for s in shards]
