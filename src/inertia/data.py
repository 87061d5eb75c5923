"""Image classification data sets as fixed train / held-out test splits; nothing is downloaded.

``digits`` (scikit-learn's 8x8 digits) and ``synthetic`` need no files. ``fashion-mnist``,
``cifar10`` and ``cifar100`` read the original files from ``data_dir``, in the layout torchvision
leaves after its own download, and keep their official test sets. ``imagefolder`` reads any folder
of class sub-folders. Fashion-MNIST and CIFAR are read by this module, not by torchvision's classes:
torchvision insists on the unzipped IDX files in one layout, and checks the MD5 of every CIFAR file
(which rejects all but the published archives, so could not be tested on small files). The CIFAR
files are pickles, as published: load only files you trust.
"""

from __future__ import annotations

import functools
import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from ._errors import InertiaError

__all__ = ["DATASETS", "IMAGE_FOLDER_SIZE", "DatasetSplit", "load_dataset"]

DATASETS = ("digits", "synthetic", "fashion-mnist", "cifar10", "cifar100", "imagefolder")

#: Side of the square images ``imagefolder`` resizes every image to.
IMAGE_FOLDER_SIZE = 64

#: Per-channel (mean, std) of pixels in [0, 1]: the published training-set values.
_STATS = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's
}
_CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch"),
    "cifar100": ("cifar-100-python", ["train"], "test"),
}
_IDX = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
_IDX_TEST = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_AS_LABEL = functools.partial(torch.tensor, dtype=torch.int64)  # picklable, for worker processes


@dataclass(frozen=True)
class DatasetSplit:
    """A data set cut into a training set and a held-out test set that share no image.

    Each item of ``train`` and ``test`` is ``(image, label)``: a float32 tensor of shape
    ``(channels, size, size)``, normalized per channel, and an int64 scalar tensor in
    ``[0, num_classes)``.

    Examples:
        >>> split = load_dataset("synthetic", synthetic_size=64)
        >>> image, label = split.train[0]
        >>> image.shape, label.dtype, len(split.train), len(split.test)
        (torch.Size([3, 8, 8]), torch.int64, 51, 13)
    """

    train: Dataset[tuple[Tensor, Tensor]]
    test: Dataset[tuple[Tensor, Tensor]]
    num_classes: int
    channels: int
    size: int
    name: str


class _Images(Dataset[tuple[Tensor, Tensor]]):
    """Images ``(N, C, H, W)`` kept as given (uint8 stays uint8), normalized when indexed."""

    def __init__(
        self, images: Tensor, labels: Tensor, stats: tuple[Tensor, Tensor], scale: float
    ) -> None:
        if len(images) != len(labels):
            raise InertiaError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.scale = images, labels.long(), scale
        self.mean, self.std = (s.float().reshape(-1, 1, 1) for s in stats)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return (self.images[i].float() / self.scale - self.mean) / self.std, self.labels[i]


def _stats(name: str) -> tuple[Tensor, Tensor]:
    mean, std = _STATS[name]
    return torch.tensor(mean), torch.tensor(std)


def _split(labels: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices (train, test), stratified: each class gives ``test_fraction`` of its items, ±1."""
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * test_fraction
    n_test = exact.floor().long()
    missing = round(len(labels) * test_fraction) - int(n_test.sum())  # largest remainders get one
    n_test[torch.argsort(n_test - exact, stable=True)[:missing]] += 1
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c, k in zip(classes.tolist(), n_test.tolist(), strict=True):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        test.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def _split_and_normalize(
    x: Tensor, y: Tensor, test_fraction: float, seed: int
) -> tuple[_Images, _Images]:
    """Stratified split of float images ``x`` (N, C, H, W), normalized by the train statistics."""
    i_train, i_test = _split(y, test_fraction, seed)
    stats = x[i_train].mean(dim=(0, 2, 3)), x[i_train].std(dim=(0, 2, 3))
    return _Images(x[i_train], y[i_train], stats, 1.0), _Images(x[i_test], y[i_test], stats, 1.0)


def _digits(test_fraction: float, seed: int) -> DatasetSplit:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise InertiaError(
            "the 'digits' data set comes with scikit-learn: pip install 'inertia[data]'"
        ) from err
    x, y = load_digits(return_X_y=True)
    images = torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    train, test = _split_and_normalize(images, torch.as_tensor(y), test_fraction, seed)
    return DatasetSplit(train, test, num_classes=10, channels=1, size=8, name="digits")


def _synthetic(n: int, test_fraction: float, seed: int) -> DatasetSplit:
    """Four classes, each a fixed random pattern (3, 8, 8) plus twice as much Gaussian noise."""
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.randn(4, 3, 8, 8, generator=generator)
    y = torch.arange(n) % 4
    x = 0.5 * patterns[y] + torch.randn(n, 3, 8, 8, generator=generator)
    train, test = _split_and_normalize(x, y, test_fraction, seed)
    return DatasetSplit(train, test, num_classes=4, channels=3, size=8, name="synthetic")


def _missing(name: str, folder: Path | None, layout: str) -> InertiaError:
    where = "no data_dir was given" if folder is None else f"looked in {folder}"
    return InertiaError(
        f"{name}: data not found ({where}). Expected {layout}. Nothing is downloaded."
    )


def _read_idx(path: Path, ndim: int) -> Tensor:
    """A uint8 IDX file (the MNIST format, optionally gzipped) as a tensor of ``ndim`` dims."""
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if data[:4] != bytes((0, 0, 8, ndim)):
        raise InertiaError(f"{path} is not a uint8 IDX file with {ndim} dimension(s)")
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist(data_dir: Path | None) -> DatasetSplit:
    layout = (
        "the four IDX files " + ", ".join(_IDX + _IDX_TEST) + " (each may end in .gz) in "
        "data_dir/FashionMNIST/raw/ (torchvision's layout) or in data_dir itself; Debian's "
        "package dataset-fashion-mnist installs them in /usr/share/datasets/fashion-mnist, "
        "or copy or link the IDX files there"
    )
    for folder in [] if data_dir is None else [data_dir / "FashionMNIST" / "raw", data_dir]:
        found = [
            next((p for p in (folder / f, folder / f"{f}.gz") if p.is_file()), None)
            for f in _IDX + _IDX_TEST
        ]
        if all(found):
            x, y, x_test, y_test = (
                _read_idx(p, n) for p, n in zip(found, (3, 1, 3, 1), strict=True) if p
            )
            train = _Images(x.unsqueeze(1), y, _stats("fashion-mnist"), 255.0)
            test = _Images(x_test.unsqueeze(1), y_test, _stats("fashion-mnist"), 255.0)
            return DatasetSplit(train, test, 10, channels=1, size=28, name="fashion-mnist")
    raise _missing("fashion-mnist", data_dir, layout)


def _cifar(name: str, data_dir: Path | None) -> DatasetSplit:
    base, train_files, test_file = _CIFAR_FILES[name]
    layout = (
        f"the python version of {name.upper()} as extracted from its archive: data_dir/{base}/ "
        f"holding {', '.join([*train_files, test_file])}"
    )
    folder = None if data_dir is None else data_dir / base
    if folder is None or not all((folder / f).is_file() for f in [*train_files, test_file]):
        raise _missing(name, data_dir, layout)

    def read(files: list[str]) -> tuple[Tensor, Tensor]:
        images, labels = [], []
        for f in files:
            with open(folder / f, "rb") as file:
                entry: dict[Any, Any] = pickle.load(file, encoding="latin1")
            entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
            images.append(torch.as_tensor(entry["data"], dtype=torch.uint8).reshape(-1, 3, 32, 32))
            labels.append(torch.as_tensor(entry["labels" if name == "cifar10" else "fine_labels"]))
        return torch.cat(images), torch.cat(labels)

    train = _Images(*read(train_files), _stats(name), 255.0)
    test = _Images(*read([test_file]), _stats(name), 255.0)
    return DatasetSplit(train, test, 10 if name == "cifar10" else 100, 3, 32, name)


def _image_folder(data_dir: Path | None, test_fraction: float, seed: int) -> DatasetSplit:
    layout = "data_dir/<class>/<image> (or data_dir/train/<class>/... and data_dir/val/<class>/...)"
    if data_dir is None or not data_dir.is_dir():
        raise _missing("imagefolder", data_dir, layout)
    try:
        from torchvision import transforms
        from torchvision.datasets import ImageFolder
    except ImportError as err:
        raise InertiaError(
            "'imagefolder' needs torchvision: pip install 'inertia[vision]'"
        ) from err
    resize = transforms.Resize((IMAGE_FOLDER_SIZE, IMAGE_FOLDER_SIZE))
    normalize = transforms.Normalize(*_STATS["imagefolder"])
    transform = transforms.Compose([resize, transforms.ToTensor(), normalize])

    def folder(path: Path) -> Any:
        try:
            return ImageFolder(path, transform=transform, target_transform=_AS_LABEL)
        except FileNotFoundError as err:
            raise InertiaError(f"imagefolder: {err}. Expected {layout}.") from err

    if (data_dir / "train").is_dir() and (data_dir / "val").is_dir():
        train, test = folder(data_dir / "train"), folder(data_dir / "val")
        if train.classes != test.classes:
            raise InertiaError(f"imagefolder: {data_dir}/train and val have different classes")
        num_classes = len(train.classes)
    else:
        images = folder(data_dir)
        i_train, i_test = _split(torch.as_tensor(images.targets), test_fraction, seed)
        train, test = Subset(images, i_train.tolist()), Subset(images, i_test.tolist())
        num_classes = len(images.classes)
    return DatasetSplit(train, test, num_classes, 3, IMAGE_FOLDER_SIZE, "imagefolder")


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    synthetic_size: int = 512,
) -> DatasetSplit:
    """Load a data set from `DATASETS` as a deterministic train / held-out test split.

    ``digits`` (1,797 images, 1x8x8, 10 classes; needs scikit-learn: ``inertia[data]``) and
    ``synthetic`` (``synthetic_size`` images, 3x8x8, 4 classes, for tests) are split here,
    stratified by class, and normalized with the training part's per-channel mean and std.
    ``fashion-mnist`` (1x28x28, 10 classes), ``cifar10`` and ``cifar100`` (3x32x32) keep their
    official train and test sets and the published mean and std. ``imagefolder`` reads
    ``data_dir/<class>/<image>``, split here (or ``data_dir/train`` and ``data_dir/val``), resized
    to 3x64x64 and normalized with ImageNet's mean and std. No augmentation anywhere.

    Args:
        name: One of `DATASETS`.
        data_dir: The folder holding the files of ``fashion-mnist``, ``cifar*`` and ``imagefolder``.
        seed: Seeds the split and the ``synthetic`` data: the same seed gives the same split.
        test_fraction: Share of each class held out, where the split is made here.
        synthetic_size: Number of ``synthetic`` images.

    Returns:
        The split, whose items are ``(image (C, H, W) float32, label int64 scalar)``.

    Raises:
        ValueError: Unknown ``name``, or ``test_fraction`` outside (0, 1).
        InertiaError: Files missing (the message gives the expected layout) or an optional
            dependency missing (it gives the ``pip install``).

    Examples:
        >>> split = load_dataset("synthetic", seed=1)
        >>> split.num_classes, split.channels, split.size, len(split.train) + len(split.test)
        (4, 3, 8, 512)
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    folder = None if data_dir is None else Path(data_dir).expanduser()
    if name == "digits":
        return _digits(test_fraction, seed)
    if name == "synthetic":
        return _synthetic(synthetic_size, test_fraction, seed)
    if name == "fashion-mnist":
        return _fashion_mnist(folder)
    if name == "imagefolder":
        return _image_folder(folder, test_fraction, seed)
    return _cifar(name, folder)
