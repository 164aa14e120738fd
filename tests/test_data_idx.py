"""Strict IDX reader and Fashion-MNIST from Debian's dataset-fashion-mnist."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from free_common.data.fashion_mnist import CLASS_NAMES, load_fashion_mnist
from free_common.data.idx import read_idx
from free_common.errors import DatasetLayoutError, IdxFormatError


def _idx(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def test_reads_plain_and_gzip_files(tmp_path: Path) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a-ubyte").write_bytes(_idx(images))
    (tmp_path / "a-ubyte.gz").write_bytes(gzip.compress(_idx(images)))
    for name in ("a-ubyte", "a-ubyte.gz"):
        assert np.array_equal(read_idx(tmp_path / name, ndim=3, dtype=np.uint8), images)
    wide = np.array([1, -2, 70000], dtype=np.int32)
    (tmp_path / "b").write_bytes(_idx(wide, 0x0C))
    out = read_idx(tmp_path / "b")
    assert out.tolist() == [1, -2, 70000] and out.dtype == np.dtype(np.int32)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b"\x01\x02" + b[2:], "bad magic"),
        (lambda b: b[:-1], "truncated: shape \\(2, 3, 4\\) needs 24 payload bytes, found 23"),
        (lambda b: b + b"\x00", "longer than its header says"),
        (lambda b: b[:9], "truncated inside its header"),
        (lambda b: b[:2] + b"\x07" + b[3:], "unknown IDX element type 0x07"),
        (lambda b: b[:3] + b"\x00" + b[4:], "declares 0 dimensions"),
        (lambda b: b"", "bad magic"),
    ],
)
def test_corrupt_files_raise_one_clear_line(tmp_path: Path, mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    good = _idx(np.zeros((2, 3, 4), np.uint8))
    path = tmp_path / "x-ubyte"
    path.write_bytes(mutate(good))
    with pytest.raises(IdxFormatError, match=message) as caught:
        read_idx(path, hint="; run: fix it")
    assert "\n" not in str(caught.value) and str(caught.value).endswith("; run: fix it")


def test_damaged_gzip_and_unexpected_kind(tmp_path: Path) -> None:
    compressed = gzip.compress(_idx(np.zeros((5, 28, 28), np.uint8)))
    (tmp_path / "cut.gz").write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(IdxFormatError, match="damaged gzip"):
        read_idx(tmp_path / "cut.gz")
    (tmp_path / "labels").write_bytes(_idx(np.zeros(5, np.uint8)))
    with pytest.raises(IdxFormatError, match="1 dimensions, expected 3"):
        read_idx(tmp_path / "labels", ndim=3)
    (tmp_path / "floats").write_bytes(_idx(np.zeros(5, np.float32), 0x0D))
    with pytest.raises(IdxFormatError, match="holds float32 values, expected uint8"):
        read_idx(tmp_path / "floats", dtype=np.uint8)
    with pytest.raises(IdxFormatError, match="cannot read"):
        read_idx(tmp_path / "missing")


def test_fashion_mnist_from_the_debian_package() -> None:
    test = load_fashion_mnist("test")
    assert test.images.shape == (10000, 28, 28) and test.images.dtype == np.uint8
    assert test.class_names == CLASS_NAMES
    assert test.class_counts().tolist() == [1000] * 10
    assert test.images.max() == 255


def _fake_fashion(root: Path, images: bytes, labels: bytes) -> None:
    for prefix in ("train", "t10k"):
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(images))
        (root / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))


def test_fashion_mnist_checks_its_files(tmp_path: Path) -> None:
    images, labels = np.zeros((3, 28, 28), np.uint8), np.array([0, 9, 4], np.uint8)
    _fake_fashion(tmp_path, _idx(images), _idx(labels))
    assert load_fashion_mnist("all", tmp_path).labels.tolist() == [0, 9, 4, 0, 9, 4]
    _fake_fashion(tmp_path, _idx(images), _idx(np.array([0, 9], np.uint8)))
    with pytest.raises(IdxFormatError, match="3 images but 2 labels"):
        load_fashion_mnist("test", tmp_path)
    _fake_fashion(tmp_path, _idx(images), _idx(np.array([0, 10, 1], np.uint8)))
    with pytest.raises(IdxFormatError, match="label 10"):
        load_fashion_mnist("test", tmp_path)
    with pytest.raises(DatasetLayoutError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("test", tmp_path / "empty")
    with pytest.raises(DatasetLayoutError, match="no split 'val'"):
        load_fashion_mnist("val", tmp_path)
