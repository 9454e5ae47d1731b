"""Datasets held in memory as tensors (per-member batches of them: ``fused_ensemble.training.batches``).

- ``load_digits()``: scikit-learn's 8x8 handwritten digits (shipped with scikit-learn, no download).
- ``load_cifar10(root)``: CIFAR-10 from a local ``cifar-10-batches-py`` folder (the standard python format, no
  download). The format's files are pickles: they are read with ``CifarUnpickler``, which builds dicts, lists,
  strings, numbers and numpy arrays and refuses anything else, so a folder cannot make the loader run code.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass

import torch

__all__ = ["ImageData", "load_digits", "load_cifar10", "CifarUnpickler", "read_cifar_pickle"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_FOLDER = "cifar-10-batches-py"
# The files of the official archive and their md5 sums (as torchvision's CIFAR10 lists them).
CIFAR10_TRAIN_FILES = (("data_batch_1", "c99cafc152244af753f735de768cd75f"),
                       ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
                       ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
                       ("data_batch_4", "634d18415352ddfa80567beed471001a"),
                       ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"))
CIFAR10_TEST_FILES = (("test_batch", "40351d587109b95175f43aff81a1287e"),)
CIFAR10_META_FILE = ("batches.meta", "5ff9c542aee3614f3951f8cda6e48888")
CIFAR10_IMAGE_SIZE = 3 * 32 * 32


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


def _numpy_array_globals() -> dict[tuple[str, str], object]:
    """The (module, name) pairs a pickled numpy array refers to, and the objects they stand for: the array
    reconstruction functions under the names older and newer numpy releases pickle them by, the array and dtype
    classes. Taken from this numpy's own reduction of an array, so they are the functions numpy loads with."""
    import numpy as np

    reconstruct = np.zeros(1).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = reconstruct
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(module, "_frombuffer")] = frombuffer
    return allowed


class CifarUnpickler(pickle.Unpickler):
    """An unpickler for the CIFAR python format: it builds the plain containers (dicts, lists, tuples), strings,
    numbers and numpy arrays that the format's files hold, and refuses every other global (a function to call, a
    class to build) with an ``pickle.UnpicklingError`` naming the file. Reading a folder never runs its code."""

    def __init__(self, file, path: str):
        super().__init__(file, encoding="latin1")  # the official files are Python 2 pickles
        self.path = path
        self.allowed = _numpy_array_globals()

    def find_class(self, module: str, name: str):
        found = self.allowed.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(
                f"{self.path}: refused to load {module}.{name}: a CIFAR batch file holds only dicts, lists, strings, "
                f"numbers and numpy arrays, and this loader builds nothing else (the file may run code when "
                f"unpickled: do not open it with pickle.load)")
        return found


def read_cifar_pickle(path: str):
    """The object pickled in ``path``, read with ``CifarUnpickler`` (plain containers and numpy arrays only)."""
    with open(path, "rb") as f:
        return CifarUnpickler(f, path).load()


def _md5(path: str) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_cifar10_batch(path: str):
    """A batch file's images (uint8 ``[M, 3072]``) and labels (``[M]``), checked: one label in 0..9 per image."""
    import numpy as np

    batch = read_cifar_pickle(path)
    if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
        raise ValueError(f"{path}: expected a dict with 'data' and 'labels' (the CIFAR-10 python format), got "
                         f"{type(batch).__name__}" + (f" with keys {sorted(map(str, batch))}"
                                                      if isinstance(batch, dict) else ""))
    images, labels = batch["data"], batch["labels"]
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 \
            or images.shape[1] != CIFAR10_IMAGE_SIZE:
        described = (f"a {images.dtype} array of shape {images.shape}" if isinstance(images, np.ndarray)
                     else type(images).__name__)
        raise ValueError(f"{path}: 'data' must be a uint8 array of shape [M, {CIFAR10_IMAGE_SIZE}] (M images of "
                         f"3x32x32 pixels), got {described}")
    if not isinstance(labels, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                         for v in labels):
        raise ValueError(f"{path}: 'labels' must be a list of ints, got {type(labels).__name__}")
    if len(labels) != images.shape[0]:
        raise ValueError(f"{path}: {len(labels)} labels for {images.shape[0]} images: a CIFAR-10 batch has one "
                         f"label per image")
    if labels and not 0 <= min(labels) <= max(labels) <= 9:
        raise ValueError(f"{path}: labels must lie in 0..9, got {min(labels)}..{max(labels)}")
    return images, labels


def _check_limit(value: int | None, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{name} must be None or a non-negative int, got {value!r}")


def load_cifar10(root: str, verify_md5: bool = True, max_train: int | None = None,
                 max_test: int | None = None) -> ImageData:
    """CIFAR-10 from ``root/cifar-10-batches-py`` (data_batch_1..5, test_batch, batches.meta), no download.

    Images are scaled to [0, 1] and normalized with the usual CIFAR-10 channel mean/std; the full training set
    takes about 0.6 GB as float32. ``max_train``/``max_test`` keep only the first examples (quick runs).

    ``verify_md5``: each file's md5 must be that of the official archive (a ``FileNotFoundError`` names the files
    that differ). Pass False to read other files in the same format (e.g. a tiny folder written by a test). Either
    way the files are read with ``CifarUnpickler``: dicts, lists, strings, numbers and numpy arrays only, so a file
    that would run code when unpickled is refused (``pickle.UnpicklingError``). A file whose contents are not a
    CIFAR-10 batch (labels and images of different lengths, labels outside 0..9) raises a ``ValueError`` naming it.
    """
    import numpy as np

    _check_limit(max_train, "max_train")
    _check_limit(max_test, "max_test")
    folder = os.path.join(root, CIFAR10_FOLDER)
    files = [*CIFAR10_TRAIN_FILES, *CIFAR10_TEST_FILES, CIFAR10_META_FILE]
    missing = [name for name, _ in files if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 not found or corrupted under {root!r}: expected {folder} with data_batch_1..5, test_batch and "
            f"batches.meta in the python format; missing {', '.join(missing)}")
    if verify_md5:
        differ = [name for name, md5 in files if _md5(os.path.join(folder, name)) != md5]
        if differ:
            raise FileNotFoundError(
                f"CIFAR-10 not found or corrupted under {root!r}: {', '.join(differ)} in {folder} do not have the "
                f"official archive's md5 (pass verify_md5=False, --no-verify-md5 on the command line, to read other "
                f"files in the format)")
    meta = read_cifar_pickle(os.path.join(folder, CIFAR10_META_FILE[0]))
    classes = meta.get("label_names") if isinstance(meta, dict) else None
    if not isinstance(classes, list) or len(classes) != 10 or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"{os.path.join(folder, CIFAR10_META_FILE[0])}: expected a dict whose 'label_names' are the "
                         f"10 class names")
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    splits = []
    for names, limit in ((CIFAR10_TRAIN_FILES, max_train), (CIFAR10_TEST_FILES, max_test)):
        batches = [_read_cifar10_batch(os.path.join(folder, name)) for name, _ in names]
        images = np.concatenate([images for images, _ in batches])[:limit]
        labels = [label for _, batch_labels in batches for label in batch_labels][:limit]
        # Each row is one image, channel-major: 1024 red, then green, then blue pixels, row by row.
        x = torch.from_numpy(images).view(-1, 3, 32, 32).float().div_(255)
        splits.append(((x - mean) / std, torch.tensor(labels, dtype=torch.int64)))
    (train_x, train_y), (test_x, test_y) = splits
    return ImageData("cifar10", train_x, train_y, test_x, test_y, list(classes))
