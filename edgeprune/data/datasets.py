"""Data sets by name, each with three splits: train, held-out (carved from train), test.

The held-out split is what the search's accuracy proxy scores; the test split is only for the
final figures and is never used to choose anything.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edgeprune.data.splits import ArraySplit, Augment, FolderSplit, Split
from edgeprune.errors import EdgepruneError, choices_error

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "EDGEPRUNE_FASHION_MNIST"
NAMES = ("fashion-mnist", "digits[:SIZE]", "cifar10", "imagefolder:PATH")
HELDOUT_SEED = 20240601


@dataclass
class Dataset:
    """A data set ready for training and evaluation."""

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]  # C, H, W
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train: Split
    heldout: Split
    test: Split
    augment: Augment | None = None
    classes: list[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)  # how it was loaded beyond its name (imagefolder: size, mean, std)

    def split(self, name: str) -> Split:
        if name not in ("train", "heldout", "test"):
            raise choices_error("split", name, ["train", "heldout", "test"])
        return getattr(self, name)

    def batches(self, split: str, batch_size: int, *, train: bool = False, **kw):
        """Normalised batches of `split`; `train=True` shuffles and augments."""
        return self.split(split).batches(
            batch_size,
            mean=self.mean,
            std=self.std,
            shuffle=train,
            augment=self.augment if train else None,
            **kw,
        )

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.randn(batch, *self.input_shape)


def carve_heldout(n_train: int, size: int, seed: int = HELDOUT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (train, held-out) index split of `n_train` items."""
    if not 0 < size < n_train:
        raise EdgepruneError(f"held-out size must be between 1 and {n_train - 1}, got {size}")
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(n_train))
    return perm[size:].sort().values, perm[:size].sort().values


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise EdgepruneError(f"{path} is not a gzipped IDX file; reinstall dataset-fashion-mnist")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise EdgepruneError(f"{path} is truncated ({arr.size} of {int(np.prod(dims))} values)")
    return arr.reshape(dims)


def _fashion_mnist_arrays(root: Path, download: bool) -> dict[str, np.ndarray]:
    files = {
        "train_x": "train-images-idx3-ubyte.gz",
        "train_y": "train-labels-idx1-ubyte.gz",
        "test_x": "t10k-images-idx3-ubyte.gz",
        "test_y": "t10k-labels-idx1-ubyte.gz",
    }
    missing = [f for f in files.values() if not (root / f).is_file()]
    if missing and download:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(root), download=True)
        root = root / "FashionMNIST" / "raw"
        missing = [f for f in files.values() if not (root / f).is_file()]
    if missing:
        raise EdgepruneError(
            f"Fashion-MNIST not found in {root} (missing {missing[0]}): install it with "
            f"`sudo apt-get install dataset-fashion-mnist` (or `make data`), or set {FASHION_MNIST_ENV} "
            "to a folder holding the gzipped IDX files"
        )
    return {k: _read_idx(root / f) for k, f in files.items()}


FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def fashion_mnist(root: str | os.PathLike | None = None, *, heldout: int = 5000, download: bool = False) -> Dataset:
    root = Path(root or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)
    a = _fashion_mnist_arrays(root, download)
    train = ArraySplit(torch.from_numpy(a["train_x"].copy())[:, None], torch.from_numpy(a["train_y"].astype(np.int64)))
    test = ArraySplit(torch.from_numpy(a["test_x"].copy())[:, None], torch.from_numpy(a["test_y"].astype(np.int64)))
    tr, ho = carve_heldout(len(train), heldout)
    return Dataset(
        "fashion-mnist",
        10,
        (1, 28, 28),
        (0.2860,),
        (0.3530,),
        train.subset(tr),
        train.subset(ho),
        test,
        Augment(pad=2, flip=True),
        FASHION_MNIST_CLASSES,
    )


def digits(*, heldout: int = 200, size: int = 8) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images): tiny, for tests and smoke runs.

    `size` > 8 upsamples (bilinear): at 8x8 a CNN's latency is mostly the runtime's per-operator
    overhead, which channel pruning cannot remove; at 16x16 the layers' own work dominates."""
    from sklearn.datasets import load_digits

    if not 8 <= size <= 64:
        raise EdgepruneError(f"digits:{size}: the size must be between 8 and 64 pixels, e.g. digits:16")
    d = load_digits()
    images = torch.from_numpy(np.clip(d.images * 16, 0, 255).astype(np.uint8))[:, None]
    if size != 8:
        up = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
        images = up.round().clamp(0, 255).to(torch.uint8)
    labels = torch.from_numpy(d.target.astype(np.int64))
    full = ArraySplit(images, labels)
    rest, test_idx = carve_heldout(len(full), 360, seed=HELDOUT_SEED + 1)
    rest_split = full.subset(rest)
    tr, ho = carve_heldout(len(rest_split), heldout)
    return Dataset(
        "digits" if size == 8 else f"digits:{size}",
        10,
        (1, size, size),
        (0.3,),
        (0.4,),
        rest_split.subset(tr),
        rest_split.subset(ho),
        full.subset(test_idx),
        Augment(pad=1, flip=False),
        [str(i) for i in range(10)],
    )


def cifar10(root: str | os.PathLike | None = None, *, heldout: int = 5000) -> Dataset:
    """CIFAR-10 from a local folder in torchvision's layout (cifar-10-batches-py/)."""
    root = Path(root or os.environ.get("EDGEPRUNE_CIFAR10") or "data/cifar10")
    if not (root / "cifar-10-batches-py").is_dir():
        raise EdgepruneError(
            f"CIFAR-10 not found: {root}/cifar-10-batches-py is missing; put torchvision's CIFAR-10 "
            "python batches there, or name the folder with cifar10:PATH"
        )
    from torchvision.datasets import CIFAR10

    def split(is_train: bool) -> ArraySplit:
        ds = CIFAR10(str(root), train=is_train, download=False)
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        return ArraySplit(x, torch.tensor(ds.targets))

    train, test = split(True), split(False)
    tr, ho = carve_heldout(len(train), heldout)
    return Dataset(
        "cifar10",
        10,
        (3, 32, 32),
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        train.subset(tr),
        train.subset(ho),
        test,
        Augment(pad=4, flip=True),
        ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
    )


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagefolder(
    path: str | os.PathLike,
    *,
    size: int = 224,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    heldout: float = 0.1,
) -> Dataset:
    """PATH/train and PATH/val (or PATH/test), one folder per class, RGB at `size` x `size`
    (random resized crops and flips for training; resize to size x 256/224 and a centre crop for
    evaluation, as torchvision's ImageNet weights were made), normalised by `mean` and `std` (the
    statistics the weights were trained with: ImageNet's for torchvision's)."""
    from torchvision import datasets, transforms

    path = Path(path)
    test_dir = next((path / d for d in ("val", "test") if (path / d).is_dir()), None)
    if not (path / "train").is_dir() or test_dir is None:
        raise EdgepruneError(f"imagefolder:{path} needs {path}/train and {path}/val (or test), one folder per class")
    if not 8 <= int(size) <= 4096:
        raise EdgepruneError(f"image size {size} is out of range; give --image-size between 8 and 4096")
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise EdgepruneError(f"--mean and --std need three values each (RGB), std positive; got {mean}, {std}")
    resolution = int(size)
    resize = int(resolution * 256 / 224)
    train_tf = transforms.Compose(
        [transforms.RandomResizedCrop(resolution), transforms.RandomHorizontalFlip(), transforms.ToTensor()]
    )
    eval_tf = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(resolution), transforms.ToTensor()])
    try:
        train_aug = datasets.ImageFolder(str(path / "train"), transform=train_tf)
        train_eval = datasets.ImageFolder(str(path / "train"), transform=eval_tf)
        test = datasets.ImageFolder(str(test_dir), transform=eval_tf)
    except (FileNotFoundError, RuntimeError) as e:
        raise EdgepruneError(f"imagefolder:{path}: {str(e).splitlines()[0][:160]}") from None
    if train_aug.classes != test.classes:
        raise EdgepruneError(f"imagefolder:{path}: train/ and {test_dir.name}/ hold different class folders")
    n_ho = max(1, int(len(train_aug) * heldout))
    tr, ho = carve_heldout(len(train_aug), n_ho)
    return Dataset(
        f"imagefolder:{path}",
        len(train_aug.classes),
        (3, resolution, resolution),
        tuple(float(v) for v in mean),
        tuple(float(v) for v in std),
        FolderSplit(train_aug, tr),
        FolderSplit(train_eval, ho),
        FolderSplit(test),
        None,
        train_aug.classes,
        {"size": resolution, "mean": [float(v) for v in mean], "std": [float(v) for v in std]},
    )


def load_dataset(
    name: str, *, root: str | os.PathLike | None = None, download: bool = False, options: dict | None = None
) -> Dataset:
    """A data set by name: fashion-mnist, digits[:SIZE], cifar10[:PATH], imagefolder:PATH (with
    `options` size, mean, std: see `imagefolder`)."""
    kind, _, arg = name.partition(":")
    options = {k: v for k, v in (options or {}).items() if v is not None}
    if options and kind != "imagefolder":
        raise EdgepruneError(f"{', '.join(sorted(options))} apply to imagefolder:PATH data only, not {name}")
    if kind == "imagefolder" and arg:
        unknown = set(options) - {"size", "mean", "std"}
        if unknown:
            raise EdgepruneError(f"unknown imagefolder option(s) {sorted(unknown)}; known: size, mean, std")
        return imagefolder(arg, **options)
    if kind == "fashion-mnist":
        return fashion_mnist(arg or root, download=download)
    if kind == "digits":
        if arg and not arg.isdigit():
            raise EdgepruneError(f"{name!r}: digits takes an image size, e.g. digits:16")
        return digits(size=int(arg or 8))
    if kind == "cifar10":
        return cifar10(arg or root)
    raise choices_error("data set", name, NAMES)
