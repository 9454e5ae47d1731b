"""Datasets held in memory as tensors (per-member batches of them: ``fused_ensemble.training.batches``).

- ``load_digits()``: scikit-learn's 8x8 handwritten digits (shipped with scikit-learn, no download).
- ``load_cifar10(root)``: CIFAR-10 from a local ``cifar-10-batches-py`` folder (the standard python format),
  read with ``torchvision.datasets.CIFAR10(root, download=False)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ImageData", "load_digits", "load_cifar10"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass
class ImageData:
    """A train/test split of normalized images ``[M, C, H, W]`` float32 with int64 labels ``[M]``."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def load_digits(test_fraction: float = 0.25, split_seed: int = 0) -> ImageData:
    """scikit-learn's digits (1797 images, 1x8x8, 10 classes) with a fixed stratified train/test split.

    Pixels (0..16) are scaled to [0, 1], then standardized with the training set's mean and std (one scalar
    each), so the test set does not leak into the normalization.
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(torch.arange(len(y)).numpy(), test_size=test_fraction,
                                           stratify=y.numpy(), random_state=split_seed)
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = (x - mean) / std
    return ImageData("digits", x[train_idx], y[train_idx], x[test_idx], y[test_idx],
                     [str(d) for d in digits.target_names])


def _cifar10_dataset_class(verify_md5: bool):
    from torchvision.datasets import CIFAR10

    if verify_md5:
        return CIFAR10

    class UnverifiedCIFAR10(CIFAR10):
        # torchvision's check_integrity(path, md5=None) only checks that the file exists.
        train_list = [[name, None] for name, _ in CIFAR10.train_list]
        test_list = [[name, None] for name, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

    return UnverifiedCIFAR10


def load_cifar10(root: str, verify_md5: bool = True, max_train: int | None = None,
                 max_test: int | None = None) -> ImageData:
    """CIFAR-10 from ``root/cifar-10-batches-py`` (data_batch_1..5, test_batch, batches.meta), no download.

    Images are scaled to [0, 1] and normalized with the usual CIFAR-10 channel mean/std; the full training set
    takes about 0.6 GB as float32. ``max_train``/``max_test`` keep only the first examples (quick runs).

    ``verify_md5``: torchvision checks each file's md5 against the official archive. Pass False to read other
    files in the same format (e.g. a tiny folder written by a test): a ``CIFAR10`` subclass whose file lists
    carry no md5, for which torchvision only checks that the files exist. The files are pickles, as the format
    defines: read only folders you trust.
    """
    dataset_class = _cifar10_dataset_class(verify_md5)
    splits = []
    for train, limit in ((True, max_train), (False, max_test)):
        try:
            dataset = dataset_class(root, train=train, download=False)
        except RuntimeError as error:
            raise FileNotFoundError(
                f"CIFAR-10 not found or corrupted under {root!r}: expected {root}/cifar-10-batches-py with "
                f"data_batch_1..5, test_batch and batches.meta in the python format ({error})") from error
        x = torch.from_numpy(dataset.data[:limit]).permute(0, 3, 1, 2).float().div_(255)
        mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
        splits.append(((x - mean) / std, torch.tensor(dataset.targets[:limit], dtype=torch.int64)))
    (train_x, train_y), (test_x, test_y) = splits
    return ImageData("cifar10", train_x, train_y, test_x, test_y, list(dataset.classes))
