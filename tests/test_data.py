"""Datasets: digits and a tiny CIFAR-10 folder, read without running code from it."""

import io
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


class Python2StylePickler(pickle.Pickler):
    """Pickles numpy arrays as the official CIFAR-10 files hold them (Python 2, numpy 1): protocol 2, the pixels as a
    latin-1 string rather than bytes (no ``_codecs.encode`` call)."""

    def reducer_override(self, obj):
        if isinstance(obj, np.ndarray):
            reconstruct, _, state = obj.__reduce__()
            return reconstruct, (np.ndarray, (0,), "b"), (*state[:4], state[4].decode("latin1"))
        return NotImplemented


def python2_style_pickle(obj):
    buffer = io.BytesIO()
    Python2StylePickler(buffer, protocol=2).dump(obj)
    # numpy 1 pickled its array reconstruction function by the module name numpy.core.multiarray.
    return buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def write_tiny_cifar10(root, per_batch=4, test=6, python2_style=False):
    """A cifar-10-batches-py folder in the python format with a few random images per file."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    files = {f"data_batch_{i}": per_batch for i in range(1, 6)} | {"test_batch": test}
    for name, count in files.items():
        batch = {"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, count).tolist()}
        with open(folder / name, "wb") as f:
            if python2_style:
                f.write(python2_style_pickle(batch))
            else:
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


def test_cifar10_in_the_official_files_pickle_style(tmp_path):
    write_tiny_cifar10(tmp_path, python2_style=True)
    raw = (tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes()
    assert b"numpy.core.multiarray\n_reconstruct" in raw and b"_codecs" not in raw
    cifar = data.load_cifar10(str(tmp_path), verify_md5=False)
    assert cifar.train_x.shape == (20, 3, 32, 32) and cifar.test_y.shape == (6,)
    first = pickle.loads(raw, encoding="latin1")
    assert torch.equal(cifar.train_y[:4], torch.tensor(first["labels"]))


class RunsCode:
    """Unpickling this calls os.system: what a hostile batch file could do."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os

        return os.system, (self.command,)


@pytest.mark.parametrize("verify_md5", [False, True])
def test_cifar10_batch_that_would_run_code_is_refused(tmp_path, verify_md5, monkeypatch):
    write_tiny_cifar10(tmp_path)
    marker = tmp_path / "ran"
    target = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    with open(target, "wb") as f:
        pickle.dump({"data": np.zeros((4, 3072), np.uint8), "labels": RunsCode(f"touch {marker}")}, f)
    if verify_md5:  # even a file with the official md5 is read with the restricted unpickler
        official = dict(data.CIFAR10_TRAIN_FILES + data.CIFAR10_TEST_FILES + (data.CIFAR10_META_FILE,))
        monkeypatch.setattr(data, "_md5", lambda path: official[path.rsplit("/", 1)[-1]])
    with pytest.raises(pickle.UnpicklingError, match=r"data_batch_3: refused to load \w+\.system"):
        data.load_cifar10(str(tmp_path), verify_md5=verify_md5)
    assert not marker.exists()


def test_cifar10_batch_with_more_labels_than_images_names_the_file(tmp_path):
    write_tiny_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((6, 3072), np.uint8), "labels": [1] * 7}, f)
    with pytest.raises(ValueError, match=r"test_batch: 7 labels for 6 images"):
        data.load_cifar10(str(tmp_path), verify_md5=False)
    with pytest.raises(ValueError, match="max_train must be None or a non-negative int"):
        data.load_cifar10(str(tmp_path), verify_md5=False, max_train=-1)


def test_cifar10_md5_sums_are_torchvision_s():
    from torchvision.datasets import CIFAR10

    assert [list(f) for f in data.CIFAR10_TRAIN_FILES] == CIFAR10.train_list
    assert [list(f) for f in data.CIFAR10_TEST_FILES] == CIFAR10.test_list
    assert data.CIFAR10_META_FILE == (CIFAR10.meta["filename"], CIFAR10.meta["md5"])
