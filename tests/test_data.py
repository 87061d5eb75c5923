"""`inertia.data`: splits held out and deterministic, files read in their published formats."""

from __future__ import annotations

import gzip
import pickle
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from inertia import InertiaError
from inertia.data import DATASETS, IMAGE_FOLDER_SIZE, DatasetSplit, load_dataset

FASHION_FILES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]
CIFAR10_FILES = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"]
CIFAR_STATS = {  # the published per-channel mean and std, as documented
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
CIFAR_LAYOUTS = {  # folder, label key, pickled batches, metadata file
    "cifar10": ("cifar-10-batches-py", "labels", [*CIFAR10_FILES, "test_batch"], "batches.meta"),
    "cifar100": ("cifar-100-python", "fine_labels", ["train", "test"], "meta"),
}
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


def sizes(split: DatasetSplit) -> tuple[int, int]:
    """Number of training and test items."""
    return len(split.train), len(split.test)  # type: ignore[arg-type]


def stack(dataset: Dataset[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """All images (N, C, H, W) and labels (N,) of a data set."""
    x, y = next(iter(DataLoader(dataset, batch_size=100_000)))
    return x, y


@pytest.fixture(params=["digits", "synthetic"])
def generated(request: pytest.FixtureRequest) -> str:
    """The data sets split here rather than by their publishers."""
    if request.param == "digits":
        pytest.importorskip("sklearn")
    name: str = request.param
    return name


def test_split_sizes_shapes_and_stratification(generated: str) -> None:
    split = load_dataset(generated, test_fraction=0.2)
    total = 1797 if generated == "digits" else 512
    assert sum(sizes(split)) == total
    (x, y), (x_test, y_test) = stack(split.train), stack(split.test)
    shape = (split.channels, split.size, split.size)
    assert x.shape[1:] == x_test.shape[1:] == shape
    assert x.dtype == x_test.dtype == torch.float32
    assert y.dtype == y_test.dtype == torch.int64
    counts = torch.bincount(torch.cat([y, y_test]), minlength=split.num_classes)
    expected = counts.double() * 0.2
    test_counts = torch.bincount(y_test, minlength=split.num_classes).double()
    assert (test_counts - expected).abs().max() < 1


def test_split_held_out_and_normalized(generated: str) -> None:
    split = load_dataset(generated)
    (x, _), (x_test, _) = stack(split.train), stack(split.test)
    assert torch.cdist(x.flatten(1), x_test.flatten(1)).min() > 0  # no image in both
    torch.testing.assert_close(
        x.mean(dim=(0, 2, 3)), torch.zeros(split.channels), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(x.std(dim=(0, 2, 3)), torch.ones(split.channels), atol=1e-4, rtol=0)


def test_split_deterministic(generated: str) -> None:
    a, b, c = (stack(load_dataset(generated, seed=s).test) for s in (3, 3, 4))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(a[0], c[0])


def test_synthetic_learnable() -> None:
    split = load_dataset("synthetic")
    (x, y), (x_test, y_test) = stack(split.train), stack(split.test)
    torch.manual_seed(0)
    model = nn.Linear(x[0].numel(), split.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(50):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x.flatten(1)), y)
        torch.autograd.backward(loss)
        optimizer.step()
    accuracy = (model(x_test.flatten(1)).argmax(1) == y_test).double().mean()
    assert accuracy > 0.5  # chance: 0.25


def write_cifar(root: Path, name: str, n: int = 10, bytes_keys: bool = True) -> Tensor:
    """A tiny CIFAR folder in the published format; returns the test batch (n, 3, 32, 32)."""
    folder, label_key, files, meta = CIFAR_LAYOUTS[name]
    (root / folder).mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for file in files:
        data = torch.randint(0, 256, (n, 3072), dtype=torch.uint8, generator=generator)
        entry: dict[Any, Any] = {
            "data": data.numpy(),
            label_key: list(range(n)),
            "batch_label": file,
        }
        if bytes_keys:  # as a Python 3 pickle of the brief's format; the originals have str keys
            entry = {k.encode(): v for k, v in entry.items()}
        (root / folder / file).write_bytes(pickle.dumps(entry))
    (root / folder / meta).write_bytes(pickle.dumps({"label_names": ["a"]}))
    return data.reshape(n, 3, 32, 32)


@pytest.mark.parametrize("bytes_keys", [True, False])
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_tiny_folder(tmp_path: Path, name: str, bytes_keys: bool) -> None:
    pytest.importorskip("numpy")
    raw = write_cifar(tmp_path, name, bytes_keys=bytes_keys)
    split = load_dataset(name, data_dir=str(tmp_path))
    assert sizes(split) == ((50, 10) if name == "cifar10" else (10, 10))
    assert (split.num_classes, split.channels, split.size) == (
        10 if name == "cifar10" else 100,
        3,
        32,
    )
    x_test, y_test = stack(split.test)
    torch.testing.assert_close(y_test, torch.arange(10))
    # Undo the documented normalization: the pixels come back exactly.
    mean, std = (torch.tensor(s).reshape(3, 1, 1) for s in CIFAR_STATS[name])
    pixels = (x_test * std + mean) * 255
    torch.testing.assert_close(pixels.round().to(torch.uint8), raw)


def write_idx(path: Path, data: Tensor, compress: bool) -> None:
    """A uint8 IDX file (the MNIST format): magic, big-endian sizes, then the bytes."""
    header = bytes((0, 0, 8, data.dim())) + b"".join(s.to_bytes(4, "big") for s in data.shape)
    content = header + bytes(data.flatten().tolist())
    if compress:
        path, content = path.with_name(path.name + ".gz"), gzip.compress(content)
    path.write_bytes(content)


def write_fashion(folder: Path, compress: bool) -> tuple[Tensor, Tensor]:
    """Tiny Fashion-MNIST IDX files (12 train, 5 test images); returns the train set."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.arange(12, dtype=torch.uint8) % 10
    for stem, x, y in [("train", images, labels), ("t10k", images[:5], labels[:5])]:
        write_idx(folder / f"{stem}-images-idx3-ubyte", x, compress)
        write_idx(folder / f"{stem}-labels-idx1-ubyte", y, compress)
    return images, labels


@pytest.mark.parametrize(
    ("layout", "compress"), [("FashionMNIST/raw", False), ("FashionMNIST/raw", True), (".", True)]
)
def test_fashion_mnist_tiny_files(tmp_path: Path, layout: str, compress: bool) -> None:
    images, labels = write_fashion(tmp_path / layout, compress)
    split = load_dataset("fashion-mnist", data_dir=tmp_path)
    assert (*sizes(split), split.num_classes) == (12, 5, 10)
    x, y = stack(split.train)
    assert x.shape == (12, 1, 28, 28)
    torch.testing.assert_close(y, labels.long())
    torch.testing.assert_close(((x * 0.3530 + 0.2860) * 255).round().to(torch.uint8)[:, 0], images)
    if layout != "." and not compress:  # torchvision's own reader agrees
        datasets = pytest.importorskip("torchvision.datasets")
        reference = datasets.FashionMNIST(tmp_path, train=True, download=False)
        torch.testing.assert_close(reference.data, images)


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="Debian's dataset-fashion-mnist absent")
def test_fashion_mnist_debian_package() -> None:
    split = load_dataset("fashion-mnist", data_dir=DEBIAN_FASHION)
    assert sizes(split) == (60_000, 10_000)


@pytest.mark.parametrize(
    ("name", "files"),
    [
        ("fashion-mnist", [*FASHION_FILES, "dataset-fashion-mnist"]),
        ("cifar10", ["cifar-10-batches-py", *CIFAR10_FILES, "test_batch"]),
        ("cifar100", ["cifar-100-python", "train", "test"]),
        ("imagefolder", ["<class>"]),
    ],
)
@pytest.mark.parametrize("given", [False, True])
def test_missing_files_name_layout(
    tmp_path: Path, name: str, files: list[str], given: bool
) -> None:
    data_dir = tmp_path / "absent" if given else None
    with pytest.raises(InertiaError, match="Nothing is downloaded") as info:
        load_dataset(name, data_dir=data_dir)
    message = str(info.value)
    assert name in message
    assert str(data_dir) in message if given else "no data_dir" in message
    for file in files:
        assert file in message


def test_cifar_partial_folder_is_missing(tmp_path: Path) -> None:
    pytest.importorskip("numpy")
    write_cifar(tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(InertiaError, match="data_batch_3"):
        load_dataset("cifar10", data_dir=tmp_path)


def write_pngs(folder: Path, classes: tuple[str, ...] = ("cat", "dog"), n: int = 5) -> None:
    image = pytest.importorskip("PIL.Image")
    for k, name in enumerate(classes):
        (folder / name).mkdir(parents=True)
        for i in range(n):
            pixels = bytes([40 * k + i]) * (3 * 10 * 12)
            image.frombytes("RGB", (12, 10), pixels).save(folder / name / f"{i}.png")


def test_image_folder_split(tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    write_pngs(tmp_path)
    split = load_dataset("imagefolder", data_dir=tmp_path, seed=1)
    assert (*sizes(split), split.num_classes) == (8, 2, 2)
    (x, y), (x_test, y_test) = stack(split.train), stack(split.test)
    assert x.shape == (8, 3, IMAGE_FOLDER_SIZE, IMAGE_FOLDER_SIZE)
    assert x.dtype == torch.float32
    assert y.dtype == torch.int64
    torch.testing.assert_close(torch.bincount(y_test), torch.tensor([1, 1]))
    assert torch.cdist(x.flatten(1), x_test.flatten(1)).min() > 0
    torch.testing.assert_close(
        stack(load_dataset("imagefolder", data_dir=tmp_path, seed=1).test), (x_test, y_test)
    )


def test_image_folder_train_val(tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    write_pngs(tmp_path / "train", n=3)
    write_pngs(tmp_path / "val", n=2)
    split = load_dataset("imagefolder", data_dir=tmp_path)
    assert sizes(split) == (6, 4)
    write_pngs(tmp_path / "other" / "val", classes=("ant",), n=1)
    write_pngs(tmp_path / "other" / "train", n=1)
    with pytest.raises(InertiaError, match="different classes"):
        load_dataset("imagefolder", data_dir=tmp_path / "other")


def test_image_folder_without_images(tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    with pytest.raises(InertiaError, match=r"Expected data_dir/<class>/<image>"):
        load_dataset("imagefolder", data_dir=tmp_path)


def test_unknown_name_lists_datasets() -> None:
    with pytest.raises(ValueError, match="unknown data set 'mnist'") as info:
        load_dataset("mnist")
    assert all(name in str(info.value) for name in DATASETS)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_test_fraction_checked(fraction: float) -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        load_dataset("synthetic", test_fraction=fraction)


def test_digits_without_scikit_learn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(InertiaError, match=r"pip install 'inertia\[data\]'"):
        load_dataset("digits")
