"""Datasets, timm transforms, loaders and mixup for dsnet.

- ``synthetic`` (the default): :class:`SyntheticImages`, generated inside the package from a
  seed, with easy and hard samples, so a dynamic-width network has something to exploit;
- ``folder``: ImageNet layout ``root/train/<class>/*`` and ``root/val/<class>/*`` (``test/``
  stands in for ``val/`` when ``val/`` is absent, as in the CIFAR-10 JPEG copy);
- ``cifar10`` / ``cifar100``: torchvision's python format under ``root`` (never downloaded).

Every dataset yields ``(transform(PIL image), int label)`` and exposes ``.classes``.
"""
from __future__ import annotations

import colorsys
import hashlib
import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
from timm.data.loader import PrefetchLoader, fast_collate
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import MaybePILToTensor, str_to_interp_mode, str_to_pil_interp
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from dsnet.config import DATASETS, INTERPOLATIONS, NORMALIZE_ON
from dsnet.errors import UserError
from dsnet.imagecheck import unreadable

__all__ = ["DataError", "SyntheticImages", "ImageFolderDataset", "DATASETS", "CIFAR10_MEAN",
           "CIFAR10_STD", "default_normalization", "ShardSampler", "build_dataset", "build_transforms", "build_loader",
           "build_mixup", "NORMALIZE_ON", "normalizes_on_device", "DeviceTransforms", "DeviceLoader"]

_logger = logging.getLogger(__name__)

SPLITS = ("train", "val")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# Inputs up to this size are small natural images (CIFAR, synthetic): see build_transforms.
_SMALL_INPUT = 64
_MASK64 = (1 << 64) - 1


class DataError(UserError):
    """A dataset, split, image or data option that dsnet cannot use; the message names it."""


def _mix64(*keys: int) -> int:
    """SplitMix64 hash of integer keys -> a 63-bit seed; nearby keys give unrelated streams."""
    h = 0
    for key in keys:
        z = (h ^ (key & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _MASK64
        h = z ^ (z >> 31)
    return h >> 1


class SyntheticImages(Dataset):
    """Deterministic synthetic classification images, generated lazily per index.

    Class ``c`` is a coloured sinusoidal grating with its own hue, orientation and frequency
    (templates depend only on ``num_classes`` and ``image_size``, never on the seed, so train
    and val sets share them). Each sample draws a random phase and hue jitter, and a difficulty:

    - easy (probability ``easy_fraction``): full-contrast template, light noise;
    - hard: the template blended with another class's template (weight 0.52-0.65 on its own
      class), low contrast, heavy noise and, half of the time, an occluding box.

    Sample ``i`` is a pure function of ``(seed, split, i)`` computed with a local
    ``torch.Generator``: any worker can build any index, and different seeds or splits give
    independent draws.
    """

    EASY, HARD = 0, 1

    def __init__(self, length: int = 10000, num_classes: int = 10, image_size: int = 32,
                 seed: int = 0, split: str = "train", easy_fraction: float = 0.6,
                 transform: Callable | None = None) -> None:
        for key, value, ok, accepted in (("length", length, length >= 1, "an integer >= 1"),
                                         ("num_classes", num_classes, num_classes >= 2, ">= 2"),
                                         ("image_size", image_size, image_size >= 8, ">= 8"),
                                         ("easy_fraction", easy_fraction,
                                          0.0 <= easy_fraction <= 1.0, "in [0, 1]")):
            if not ok:
                raise DataError(f"synthetic {key} must be {accepted}, got {value}")
        if split not in SPLITS:
            raise DataError(f"split '{split}' is not accepted (accepted: {', '.join(SPLITS)})")
        self.length, self.num_classes, self.image_size = length, num_classes, image_size
        self.seed, self.split, self.easy_fraction = seed, split, easy_fraction
        self.transform = transform
        self.classes = [f"class_{c}" for c in range(num_classes)]
        self._sin, self._cos, self._hues = self._templates(num_classes, image_size)

    @staticmethod
    def _templates(num_classes: int, size: int) -> tuple[Tensor, Tensor, list[float]]:
        """Per-class grating bases sin/cos [K, H, W] and hues; a function of (K, size) only."""
        perm = torch.randperm(num_classes, generator=torch.Generator().manual_seed(1234))
        angle = math.pi * perm.double() / num_classes              # orientation spread over [0, pi)
        freq = 2.0 + (torch.arange(num_classes) % 3).double()      # 2, 3 or 4 cycles per image
        coords = torch.arange(size, dtype=torch.float64) / size
        y, x = coords[:, None], coords[None, :]
        proj = 2 * math.pi * freq[:, None, None] * (x * angle.cos()[:, None, None]
                                                     + y * angle.sin()[:, None, None])
        hues = [c / num_classes for c in range(num_classes)]
        return proj.sin().float(), proj.cos().float(), hues

    def __len__(self) -> int:
        return self.length

    def _draws(self, index: int) -> tuple[torch.Generator, list[float]]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} is out of range for {self.length} samples")
        gen = torch.Generator().manual_seed(_mix64(self.seed, SPLITS.index(self.split), index))
        return gen, torch.rand(12, generator=gen).tolist()

    def difficulty(self, index: int) -> int:
        """Difficulty of sample ``index``: ``SyntheticImages.EASY`` (0) or ``HARD`` (1)."""
        return self.EASY if self._draws(index)[1][0] < self.easy_fraction else self.HARD

    def label(self, index: int) -> int:
        """Class of sample ``index`` without rendering it."""
        return min(int(self._draws(index)[1][1] * self.num_classes), self.num_classes - 1)

    def _pattern(self, cls: int, phase: float, hue_shift: float, saturation: float) -> Tensor:
        """Class template with the given phase and colour: [3, H, W] in [0, 1]."""
        wave = 0.5 + 0.5 * (self._sin[cls] * math.cos(phase) + self._cos[cls] * math.sin(phase))
        hue = (self._hues[cls] + hue_shift) % 1.0
        fg = torch.tensor(colorsys.hsv_to_rgb(hue, saturation, 0.95))
        bg = torch.tensor(colorsys.hsv_to_rgb((hue + 0.5) % 1.0, 0.5 * saturation, 0.25))
        return bg[:, None, None] + (fg - bg)[:, None, None] * wave

    def render(self, index: int) -> tuple[Tensor, int]:
        """Sample ``index`` as a float image [3, H, W] in [0, 1] and its label."""
        gen, u = self._draws(index)
        label = min(int(u[1] * self.num_classes), self.num_classes - 1)
        two_pi, size = 2 * math.pi, self.image_size
        if u[0] < self.easy_fraction:
            img = self._pattern(label, two_pi * u[2], 0.04 * (u[3] - 0.5), 0.9)
            sigma = 0.06
        else:
            other = (label + 1 + int(u[4] * (self.num_classes - 1))) % self.num_classes
            own = 0.52 + 0.13 * u[5]
            img = (own * self._pattern(label, two_pi * u[2], 0.12 * (u[3] - 0.5), 0.6)
                   + (1 - own) * self._pattern(other, two_pi * u[6], 0.12 * (u[7] - 0.5), 0.6))
            img = 0.5 + (0.45 + 0.2 * u[8]) * (img - 0.5)
            sigma = 0.3
            if u[9] < 0.5:
                side = size // 2
                top, left = int(u[10] * (size - side)), int(u[11] * (size - side))
                img[:, top:top + side, left:left + side] = 0.5
        img = img + sigma * torch.randn(img.shape, generator=gen)
        return img.clamp_(0.0, 1.0), label

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img, label = self.render(index)
        array = img.mul(255).round_().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
        pil = Image.fromarray(array)    # HWC uint8 -> RGB
        return (self.transform(pil) if self.transform is not None else pil), label


class ImageFolderDataset(Dataset):
    """Images in ``split_dir/<class>/<file>``; classes are the sorted folder names.

    An unreadable image raises a :class:`DataError` naming the file, or, with
    ``skip_bad_images=True``, is replaced by the next readable sample; ``num_skipped`` counts
    those replacements in this process (each DataLoader worker keeps its own count).
    """

    def __init__(self, split_dir: str | os.PathLike, transform: Callable | None = None,
                 skip_bad_images: bool = False) -> None:
        self.root = Path(split_dir)
        self.transform, self.skip_bad_images = transform, skip_bad_images
        self.classes = _class_folders(self.root)
        if not self.classes:
            raise DataError(f"split folder '{self.root}' has no class folders (expected "
                            f"'{self.root}/<class>/<image>')")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        exts = tuple(IMG_EXTENSIONS)
        for idx, cls in enumerate(self.classes):
            files = sorted(e.path for e in os.scandir(self.root / cls)
                           if e.is_file() and e.name.lower().endswith(exts))
            if not files:
                raise DataError(f"class folder '{self.root / cls}' holds no images (accepted "
                                f"extensions: {', '.join(exts)})")
            self.samples.extend((f, idx) for f in files)
        self.targets = [t for _, t in self.samples]
        self.num_skipped = 0

    def check_files(self) -> None:
        """Find unreadable images before any work (``dsnet.imagecheck``: cheap, recorded per
        folder): raise a DataError naming them or, with ``skip_bad_images``, leave them out."""
        bad = unreadable(self.root, [path for path, _ in self.samples])
        if not bad:
            return
        named = "; ".join(f"{path} ({why})" for path, why in sorted(bad.items())[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        images = "image" if len(bad) == 1 else "images"
        if not self.skip_bad_images:
            raise DataError(f"{len(bad)} unreadable {images} under '{self.root}': {named}{more}; fix or remove "
                            f"{'it' if len(bad) == 1 else 'them'}, or set data.skip_bad_images=true to leave "
                            f"{'it' if len(bad) == 1 else 'them'} out")
        self.samples = [(path, t) for path, t in self.samples if path not in bad]
        self.targets = [t for _, t in self.samples]
        _logger.warning("left out %d unreadable %s under '%s' (data.skip_bad_images=true): %s%s", len(bad), images,
                        self.root, named, more)
        if not self.samples:
            raise DataError(f"no image under '{self.root}' can be read")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        for attempt in range(len(self.samples)):
            path, target = self.samples[(index + attempt) % len(self.samples)]
            try:
                with Image.open(path) as raw:
                    img = raw.convert("RGB")    # forces the decode: truncated files fail here
            except (OSError, ValueError, SyntaxError) as err:
                if not self.skip_bad_images:
                    raise DataError(f"cannot read image '{path}' ({err}); fix or remove it, or "
                                    f"set data.skip_bad_images=true to skip bad files") from err
                self.num_skipped += 1
                _logger.warning("skipped unreadable image '%s' (%d skipped so far)", path,
                                self.num_skipped)
                continue
            return (self.transform(img) if self.transform is not None else img), target
        raise DataError(f"no image under '{self.root}' could be read")


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir)
                  if e.is_dir() and not e.name.startswith("."))


def _folder_split_dir(root: Path, split: str) -> Path:
    """``root/train``, or ``root/val`` (``root/test`` when ``val/`` is absent)."""
    candidates = [root / "train"] if split == "train" else [root / "val", root / "test"]
    for path in candidates:
        if path.is_dir():
            return path
    present = sorted(e.name for e in os.scandir(root) if e.is_dir()) or ["none"]
    wanted = "train/" if split == "train" else "val/ or test/"
    raise DataError(f"split folder '{candidates[0]}' does not exist; '{root}' has folders: "
                    f"{', '.join(present)} (the {split} split needs {wanted} there)")


def _check_same_classes(root: Path) -> None:
    """Raise if both a train and a val (or test) split exist with different class folders."""
    train = root / "train"
    val = next((p for p in (root / "val", root / "test") if p.is_dir()), None)
    if not train.is_dir() or val is None:
        return
    a, b = set(_class_folders(train)), set(_class_folders(val))
    if a != b:
        raise DataError(f"class folders of '{train}' and '{val}' differ: only in train: "
                        f"{sorted(a - b)}, only in {val.name}: {sorted(b - a)}")


def _cifar(name: str, root: Path, split: str, transform: Callable | None) -> Dataset:
    cls, folder = ((datasets.CIFAR10, "cifar-10-batches-py") if name == "cifar10"
                   else (datasets.CIFAR100, "cifar-100-python"))
    if root.name == folder:             # accept the extracted folder itself as root
        root = root.parent
    if not (root / folder).is_dir():
        raise DataError(f"'{root / folder}' does not exist; {name} needs torchvision's python "
                        f"version extracted under '{root}' (dsnet never downloads)")
    try:
        return cls(str(root), train=split == "train", transform=transform, download=False)
    except RuntimeError as err:
        raise DataError(f"'{root / folder}' is not a complete {name} copy ({err})") from err


def build_dataset(name: str, root: str | os.PathLike | None = None, split: str = "train",
                  transform: Callable | None = None, *, skip_bad_images: bool = False,
                  check_files: bool = False, length: int | None = None, num_classes: int = 10, seed: int = 0,
                  image_size: int = 32, easy_fraction: float = 0.6) -> Dataset:
    """Build dataset ``name`` (one of ``DATASETS``) for ``split`` ("train" or "val").

    ``root`` is ignored for ``synthetic``, whose options are ``length`` (default 10000 for
    train, 2000 for val), ``num_classes``, ``seed``, ``image_size`` and ``easy_fraction``;
    train and val draw independent samples from the same seed. ``skip_bad_images`` and
    ``check_files`` (find unreadable images now: ``ImageFolderDataset.check_files``) apply to
    ``folder``. Items are ``(transform(PIL image), int label)``.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}' (accepted: {', '.join(DATASETS)})")
    if split not in SPLITS:
        raise DataError(f"split '{split}' is not accepted (accepted: {', '.join(SPLITS)})")
    if name == "synthetic":
        length = length if length is not None else (10000 if split == "train" else 2000)
        return SyntheticImages(length, num_classes, image_size, seed, split, easy_fraction,
                               transform)
    if root is None:
        raise DataError(f"dataset '{name}' needs a root directory (data.root), got None")
    path = Path(root).expanduser()
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise DataError(f"dataset root '{path}' {what} (data.root must be the folder holding "
                        f"the {name} data)")
    if name != "folder":
        return _cifar(name, path, split, transform)
    split_dir = _folder_split_dir(path, split)
    _check_same_classes(path)
    dataset = ImageFolderDataset(split_dir, transform, skip_bad_images)
    if check_files:
        dataset.check_files()
    return dataset


def _augment(auto_augment: str, size: int, mean: Sequence[float], interpolation: str) -> Any:
    """timm's RandAugment / AugMix / AutoAugment op for ``auto_augment``, as timm builds it."""
    params: dict[str, Any] = {"translate_const": int(size * 0.45),
                              "img_mean": tuple(min(255, round(255 * m)) for m in mean),
                              "interpolation": str_to_pil_interp(interpolation)}
    if auto_augment.startswith("rand"):
        return rand_augment_transform(auto_augment, params)
    if auto_augment.startswith("augmix"):
        return augment_and_mix_transform(auto_augment, {**params, "translate_pct": 0.3})
    return auto_augment_transform(auto_augment, params)


def _small_transform(size: int, is_training: bool, augment: Any, reprob: float, interpolation: str,
                     mean: Sequence[float], std: Sequence[float], uint8: bool) -> Any:
    # timm's train transform starts with RandomResizedCrop(scale=(0.08, 1)), which discards most
    # of a 32x32 image; small inputs use the CIFAR recipe instead: pad-4 random crop + flip.
    # Resize + CenterCrop are no-ops on images already at ``size`` and fix folders of other sizes.
    ops: list[Any] = [transforms.Resize(size, interpolation=str_to_interp_mode(interpolation)),
                      transforms.CenterCrop(size)]
    if is_training:
        ops += [transforms.RandomCrop(size, padding=size // 8), transforms.RandomHorizontalFlip()]
        if augment is not None:
            ops.append(augment)
    if uint8:  # as timm's use_prefetcher: the device normalises and erases (DeviceLoader)
        return transforms.Compose(ops + [MaybePILToTensor()])
    ops += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    if is_training and reprob > 0:
        ops.append(RandomErasing(reprob, mode="pixel", device="cpu"))
    return transforms.Compose(ops)


def default_normalization(input_size: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) dsnet normalises with at ``input_size``: CIFAR-10's up to 64 px, else ImageNet's."""
    small = input_size <= _SMALL_INPUT
    return (CIFAR10_MEAN, CIFAR10_STD) if small else (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


def build_transforms(input_size: int, is_training: bool, auto_augment: str | None = None,
                     reprob: float = 0.0, interpolation: str = "bilinear",
                     mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                     crop_pct: float | None = None, uint8: bool = False) -> Callable[[Image.Image], Tensor]:
    """PIL image -> normalised float tensor [3, input_size, input_size].

    Inputs of at most 64 px use the CIFAR recipe (random crop with padding + flip, optional
    timm auto-augment and random erasing; eval: tensor + normalise) and CIFAR-10 statistics;
    larger inputs use ``timm.data.create_transform`` and ImageNet statistics. ``mean``/``std``
    override the statistics; ``crop_pct`` only affects large-input evaluation.

    ``uint8``: stop at the uint8 tensor [3, input_size, input_size] (0-255), as timm's
    ``use_prefetcher`` does: the same crops and flips, no ToTensor scaling, Normalize or random
    erasing, which a ``DeviceLoader`` applies to the batch on the device.
    """
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
        raise DataError(f"input_size must be a positive integer, got {input_size!r}")
    if interpolation not in INTERPOLATIONS:
        raise DataError(f"interpolation '{interpolation}' is not accepted (accepted: "
                        f"{', '.join(INTERPOLATIONS)})")
    if not 0.0 <= reprob <= 1.0:
        raise DataError(f"reprob (random-erasing probability) must be in [0, 1], got {reprob}")
    small = input_size <= _SMALL_INPUT
    mean = tuple(mean) if mean is not None else default_normalization(input_size)[0]
    std = tuple(std) if std is not None else default_normalization(input_size)[1]
    try:   # built (and so validated) even for eval, so a bad string fails before training
        augment = _augment(auto_augment, input_size, mean, interpolation) if auto_augment else None
    except (AssertionError, KeyError, ValueError) as err:
        raise DataError(f"auto_augment '{auto_augment}' is not a timm augmentation string "
                        f"(accepted: e.g. 'rand-m9-mstd0.5', 'augmix-m5', 'v0')") from err
    if small:
        return _small_transform(input_size, is_training, augment, reprob, interpolation, mean, std, uint8)
    return create_transform(input_size, is_training=is_training, auto_augment=auto_augment,
                            interpolation=interpolation, mean=mean, std=std, re_prob=reprob,
                            re_mode="pixel", crop_pct=crop_pct, use_prefetcher=uint8)


def _seed_worker(worker_id: int) -> None:
    """Seed python, numpy and torch in a worker from the seed the loader's generator gave it.

    Recent PyTorch does this too; stating it here keeps timm's augmentations (which draw from
    ``random`` and ``numpy``) reproducible whatever the PyTorch version.
    """
    seed = torch.utils.data.get_worker_info().seed
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class ShardSampler(Sampler[int]):
    """Evaluation shard of one process: indices ``rank, rank + world, ...`` in order.

    Every sample lands on exactly one rank and none is repeated (``DistributedSampler`` pads the
    last shard with repeats to equal length), so counts summed over ranks are the counts of the
    whole set. Shards may differ in length by one sample.
    """

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def normalizes_on_device(normalize_on: str, device: torch.device) -> bool:
    """Whether a run on ``device`` takes the GPU input path for ``data.normalize_on`` (one of
    ``NORMALIZE_ON``): ``device`` always, ``workers`` never, ``auto`` on CUDA devices."""
    if normalize_on not in NORMALIZE_ON:
        raise DataError(f"data.normalize_on '{normalize_on}' is not accepted (accepted: {', '.join(NORMALIZE_ON)})")
    return normalize_on == "device" or (normalize_on == "auto" and torch.device(device).type == "cuda")


@dataclass(frozen=True)
class DeviceTransforms:
    """What a ``DeviceLoader`` does to each uint8 batch on ``device``: normalise with ``mean`` and
    ``std`` (on the 0-1 scale, as ``build_transforms`` takes them), then random erasing with
    probability ``reprob`` per image (per-pixel normal noise, as the workers' erasing)."""

    device: torch.device
    mean: tuple[float, ...]
    std: tuple[float, ...]
    reprob: float = 0.0


class _SeededErasing:
    """timm's ``RandomErasing`` on a batch, its draws a function of (loader seed, batch index).

    timm draws the boxes from ``random`` and the pixels from the device's default generator; both
    are seeded for the call and put back after it, so the erasing neither depends on nor moves the
    global streams (dropout, Gumbel noise): like the workers' erasing, it follows the loader's
    generator, which the training loop reseeds each epoch, and a resumed run erases alike.
    """

    def __init__(self, reprob: float, device: torch.device) -> None:
        self.erase = RandomErasing(reprob, mode="pixel", device=device)
        self.seed, self.batch = 0, 0

    def start(self, generator: torch.Generator) -> None:
        """A new pass: the seed is a hash of ``generator``'s state before the pass draws from it."""
        digest = hashlib.blake2b(generator.get_state().numpy().tobytes(), digest_size=8).digest()
        self.seed, self.batch = int.from_bytes(digest, "little") >> 1, 0

    def __call__(self, x: Tensor) -> Tensor:
        seed = _mix64(self.seed, self.batch)
        self.batch += 1
        gen = torch.cuda.default_generators[x.device.index] if x.device.type == "cuda" else torch.default_generator
        saved = random.getstate(), gen.get_state()
        random.seed(seed)
        gen.manual_seed(seed)
        try:
            return self.erase(x)
        finally:
            random.setstate(saved[0])
            gen.set_state(saved[1])


class DeviceLoader(PrefetchLoader):
    """timm's ``PrefetchLoader`` over a DataLoader of uint8 batches: each batch is copied to the
    device on a side stream (CUDA) while the previous one is consumed, then normalised and erased
    there (``DeviceTransforms``); batches come out as float32 [B, 3, H, W] and int64 labels on the
    device. Stands in for the DataLoader: ``len``, ``sampler``, ``generator``, ``dataset``,
    ``batch_size`` and ``drop_last`` are the DataLoader's."""

    def __init__(self, loader: DataLoader, tf: DeviceTransforms) -> None:
        super().__init__(loader, mean=tf.mean, std=tf.std, device=torch.device(tf.device))
        if tf.reprob > 0:
            self.random_erasing = _SeededErasing(tf.reprob, self.device)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self.random_erasing is not None:
            self.random_erasing.start(self.loader.generator)
        return super().__iter__()

    @property
    def generator(self) -> torch.Generator:
        return self.loader.generator

    @property
    def batch_size(self) -> int:
        return self.loader.batch_size

    @property
    def drop_last(self) -> bool:
        return self.loader.drop_last


def _uint8_collate(batch: list[tuple[Any, int]]) -> tuple[Tensor, Tensor]:
    """timm's ``fast_collate`` (uint8 images [B, 3, H, W], int64 labels), refusing float images:
    copying them into its uint8 batch would truncate them silently."""
    image = batch[0][0]
    if not isinstance(image, Tensor) or image.dtype != torch.uint8:
        got = image.dtype if isinstance(image, Tensor) else type(image).__name__
        raise DataError(f"the GPU input path (data.normalize_on) needs uint8 image tensors from the dataset "
                        f"(build_transforms(..., uint8=True)), got {got}")
    return fast_collate(batch)


def build_loader(dataset: Dataset, batch_size: int, is_training: bool, num_workers: int = 0,
                 distributed: bool = False, seed: int = 0, drop_last: bool | None = None,
                 pin_memory: bool = False, on_device: DeviceTransforms | None = None) -> DataLoader | DeviceLoader:
    """DataLoader over ``dataset``: shuffled and dropping the last partial batch when training.

    Shuffling and worker seeds come from a ``torch.Generator`` seeded with ``seed``, so two runs
    with the same seed see the same order. With ``distributed`` a ``DistributedSampler`` (seeded
    with ``seed``) shards the training data; call ``loader.sampler.set_epoch(epoch)`` each epoch.
    Evaluation shards with a ``ShardSampler``: each sample exactly once, so the evaluation
    functions' counts, summed over ranks, cover the whole set.

    ``on_device``: the GPU input path. ``dataset`` yields uint8 images (``build_transforms(...,
    uint8=True)``), batched by timm's ``fast_collate`` and wrapped in a ``DeviceLoader``, which
    normalises and erases them on the device: the batches equal the float path's (erasing aside,
    which draws its own boxes), at a quarter of the worker-to-main shared memory.
    """
    drop_last = is_training if drop_last is None else drop_last
    sampler = None
    if distributed:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise DataError("distributed=True needs torch.distributed initialised first "
                            "(call torch.distributed.init_process_group)")
        if is_training:
            sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=drop_last)
        else:
            sampler = ShardSampler(len(dataset), torch.distributed.get_rank(), torch.distributed.get_world_size())
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=is_training and sampler is None,
                        sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                        drop_last=drop_last, generator=generator,
                        worker_init_fn=_seed_worker if num_workers > 0 else None,
                        collate_fn=_uint8_collate if on_device is not None else None,
                        persistent_workers=False)  # fresh workers per epoch: seeds follow the generator, so resume is exact
    return loader if on_device is None else DeviceLoader(loader, on_device)


def build_mixup(mixup_alpha: float, cutmix_alpha: float, label_smoothing: float,
                num_classes: int) -> Mixup | None:
    """timm ``Mixup`` (batch mode; needs an even batch size) or None when both alphas are 0.

    Call it as ``images, soft_targets = mixup(images, labels)``: images [B, 3, H, W], labels [B]
    -> soft targets [B, num_classes] with ``label_smoothing`` applied.
    """
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise DataError(f"mixup and cutmix alphas must be >= 0, got mixup={mixup_alpha}, "
                        f"cutmix={cutmix_alpha}")
    if mixup_alpha == 0 and cutmix_alpha == 0:
        return None
    return Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
                 label_smoothing=label_smoothing, num_classes=num_classes)
