"""Datasets: digits and a tiny CIFAR-10 folder."""

import pickle

import numpy as np
import pytest
import torch

from fused_ensemble import data


def test_digits_split_shapes_and_normalization():
    digits = data.load_digits()
    assert digits.train_x.shape == (1347, 1, 8, 8) and digits.test_x.shape == (450, 1, 8, 8)
    assert digits.train_x.dtype == torch.float32 and digits.train_y.dtype == torch.int64
    assert digits.num_classes == 10
    assert abs(digits.train_x.mean().item()) < 1e-5 and abs(digits.train_x.std().item() - 1) < 1e-4
    # stratified: every class is in both splits in about the same proportion
    train_share = torch.bincount(digits.train_y, minlength=10) / len(digits.train_y)
    test_share = torch.bincount(digits.test_y, minlength=10) / len(digits.test_y)
    assert (train_share - test_share).abs().max() < 0.01
    again = data.load_digits()
    assert torch.equal(digits.test_x, again.test_x) and torch.equal(digits.train_y, again.train_y)


def write_tiny_cifar10(root, per_batch=4, test=6):
    """A cifar-10-batches-py folder in the python format with a few random images per file."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    files = {f"data_batch_{i}": per_batch for i in range(1, 6)} | {"test_batch": test}
    for name, count in files.items():
        batch = {"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, count).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f)
    return files


def test_cifar10_tiny_folder(tmp_path):
    write_tiny_cifar10(tmp_path)
    cifar = data.load_cifar10(str(tmp_path), verify_md5=False)
    assert cifar.train_x.shape == (20, 3, 32, 32) and cifar.test_x.shape == (6, 3, 32, 32)
    assert cifar.train_y.shape == (20,) and cifar.classes[0] == "airplane"
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        first = pickle.load(f)
    pixel = first["data"][0, 0] / 255  # channel-major rows of 1024 pixels: image 0, red, (0, 0)
    assert cifar.train_x[0, 0, 0, 0].item() == pytest.approx((pixel - data.CIFAR10_MEAN[0]) / data.CIFAR10_STD[0],
                                                             rel=1e-5)
    assert cifar.train_y[0].item() == first["labels"][0]
    limited = data.load_cifar10(str(tmp_path), verify_md5=False, max_train=7, max_test=2)
    assert limited.train_x.shape[0] == 7 and limited.test_x.shape[0] == 2


def test_cifar10_verifies_md5_by_default_and_says_where(tmp_path):
    write_tiny_cifar10(tmp_path)
    with pytest.raises(FileNotFoundError, match="CIFAR-10 not found or corrupted under"):
        data.load_cifar10(str(tmp_path))  # the tiny files do not have the official md5s
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        data.load_cifar10(str(tmp_path / "missing"), verify_md5=False)
