import gzip

import pytest
import torch

from edgeprune.data import carve_heldout, load_dataset
from edgeprune.errors import EdgepruneError


def test_fashion_mnist_splits(fmnist):
    assert (len(fmnist.train), len(fmnist.heldout), len(fmnist.test)) == (55000, 5000, 10000)
    assert fmnist.input_shape == (1, 28, 28) and fmnist.num_classes == 10
    x, y = next(fmnist.batches("heldout", 64))
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(float(x.mean())) < 0.5  # normalised


def test_heldout_is_deterministic_and_disjoint():
    tr1, ho1 = carve_heldout(60000, 5000)
    tr2, ho2 = carve_heldout(60000, 5000)
    assert torch.equal(ho1, ho2) and torch.equal(tr1, tr2)
    assert len(set(tr1.tolist()) & set(ho1.tolist())) == 0
    assert len(tr1) + len(ho1) == 60000


def test_heldout_images_not_in_train(fmnist):
    # the same image bytes must not appear in both (the IDX files hold few exact duplicates)
    train = {bytes(im.numpy().tobytes()) for im in fmnist.train.images}
    dup = sum(bytes(im.numpy().tobytes()) in train for im in fmnist.heldout.images)
    assert dup < 0.01 * len(fmnist.heldout)


def test_batches_reproducible_and_resumable(fmnist):
    a = list(fmnist.batches("train", 32, train=True, seed=3, epoch=1, limit=4))
    b = list(fmnist.batches("train", 32, train=True, seed=3, epoch=1, start=2, limit=4))
    assert torch.equal(a[2][0], b[0][0]) and torch.equal(a[3][1], b[1][1])
    c = next(fmnist.batches("train", 32, train=True, seed=3, epoch=2))
    assert not torch.equal(a[0][1], c[1])


def test_digits(digits, digits16):
    assert len(digits.train) + len(digits.heldout) + len(digits.test) == 1797
    assert digits.input_shape == (1, 8, 8)
    # upsampled: the same images and splits, at 16x16
    assert digits16.name == "digits:16" and digits16.input_shape == (1, 16, 16)
    (x8, y8), (x16, y16) = (next(d.batches("test", 32)) for d in (digits, digits16))
    assert torch.equal(y8, y16) and x16.shape[-2:] == (16, 16)
    assert torch.nn.functional.avg_pool2d(x16, 2).sub(x8).abs().mean() < 0.2 * x8.abs().mean()
    # augmented one-channel batches keep NCHW strides (channels-last ones crash oneDNN, see Augment)
    x, _ = next(digits16.batches("train", 32, train=True))
    assert x.stride() == (256, 256, 16, 1)
    for bad in ("digits:4", "digits:big"):
        with pytest.raises(EdgepruneError, match="digits"):
            load_dataset(bad)


def test_missing_fashion_mnist_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPRUNE_FASHION_MNIST", str(tmp_path))
    with pytest.raises(EdgepruneError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist")


def test_truncated_idx(tmp_path, monkeypatch):
    src = "/usr/share/datasets/fashion-mnist"
    for f in ("train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / f).write_bytes(open(f"{src}/{f}", "rb").read())
    raw = gzip.open(f"{src}/train-images-idx3-ubyte.gz").read()[:100000]
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw))
    monkeypatch.setenv("EDGEPRUNE_FASHION_MNIST", str(tmp_path))
    with pytest.raises(EdgepruneError, match="truncated"):
        load_dataset("fashion-mnist")


def test_unknown_dataset_names_choices():
    with pytest.raises(EdgepruneError, match="unknown data set 'mnist'.*fashion-mnist.*imagefolder:PATH"):
        load_dataset("mnist")


def test_cifar10_missing(tmp_path):
    with pytest.raises(EdgepruneError, match="CIFAR-10 not found"):
        load_dataset(f"cifar10:{tmp_path}")


def test_imagefolder(tmp_path):
    from PIL import Image

    for split, n in (("train", 10), ("val", 3)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40, 30), (i * 20, 0, 0)).save(tmp_path / split / cls / f"{i}.png")
    d = load_dataset(f"imagefolder:{tmp_path}")
    assert d.num_classes == 2 and d.classes == ["cat", "dog"]
    assert len(d.train) + len(d.heldout) == 20 and len(d.test) == 6
    x, y = next(d.batches("train", 4, train=True))
    assert x.shape == (4, 3, 224, 224)
