"""The memory bank: FIFO bound, pseudo-class identity, task sampling, disk round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from free_common.errors import MemoryBankError
from free_common.memory.bank import INDEX_FILE, MemoryBank
from free_common.memory.config import MemoryConfig

CPU = torch.device("cpu")
SHAPE = (1, 2, 2)


def _batch(classes: int, per_class: int, start: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose pixels count up from `start` (so each image is identifiable)."""
    labels = torch.arange(classes).repeat(per_class)
    values = start + torch.arange(classes * per_class, dtype=torch.float32)
    return values.view(-1, 1, 1, 1).expand(-1, *SHAPE).clone() / 1024, labels


def test_each_class_keeps_its_newest_images_up_to_capacity() -> None:
    bank = MemoryBank(SHAPE, MemoryConfig(capacity_per_class=5, dtype="float32"))
    seen: list[float] = []
    for step in range(4):  # 3 images of class 0 per add: 12 in all, 5 kept
        images, labels = _batch(2, 3, start=100 * step)
        bank.add("t", images, labels)
        seen += images[labels == 0, 0, 0, 0].tolist()
    assert bank.size("t:0") == 5
    assert bank.images("t:0")[:, 0, 0, 0].tolist() == seen[-5:]  # oldest first
    assert len(bank) == 10


def test_adding_more_than_capacity_at_once_keeps_the_newest() -> None:
    bank = MemoryBank(SHAPE, MemoryConfig(capacity_per_class=3, dtype="float32"))
    images, labels = _batch(1, 7, start=0)
    bank.add("t", images, labels)
    assert bank.images("t:0")[:, 0, 0, 0].tolist() == images[-3:, 0, 0, 0].tolist()


def test_teacher_and_class_make_a_pseudo_class_unless_names_are_shared() -> None:
    bank = MemoryBank(SHAPE)
    images, labels = _batch(2, 2, start=0)
    bank.add("a", images, labels)
    bank.add("b", images, labels)  # the same indices from another owner: other classes
    assert [c.key for c in bank.classes] == ["a:0", "a:1", "b:0", "b:1"]
    bank.add("c", images, labels, class_names=("cat", "dog"))
    bank.add("d", images, labels, class_names=("dog", "emu"))
    dog = next(c for c in bank.classes if c.key == "name:dog")
    assert dog.sources == [("c", 1), ("d", 0)] and dog.teacher_ids == {"c", "d"}
    assert bank.size("name:dog") == 4


def test_names_are_ignored_when_merging_is_off() -> None:
    bank = MemoryBank(SHAPE, MemoryConfig(merge_by_class_name=False))
    images, labels = _batch(2, 1, start=0)
    bank.add("c", images, labels, class_names=("cat", "dog"))
    assert [c.key for c in bank.classes] == ["c:0", "c:1"]


def test_tasks_mix_teachers_and_keep_support_and_query_apart() -> None:
    bank = MemoryBank(SHAPE, MemoryConfig(dtype="float32"))
    for teacher in range(3):
        images, labels = _batch(5, 4, start=1000 * teacher)
        bank.add(f"t{teacher}", images, labels)
    rng = torch.Generator().manual_seed(0)
    mixed = 0
    for _ in range(20):
        task = bank.sample_task(5, 1, 3, rng, CPU)
        assert task.support_x.shape == (5, *SHAPE) and task.query_x.shape == (15, *SHAPE)
        assert task.support_y.tolist() == [0, 1, 2, 3, 4]
        assert task.query_y.tolist() == [i for i in range(5) for _ in range(3)]
        assert len(set(task.classes)) == 5
        mixed += len({key.split(":")[0] for key in task.classes}) > 1
        for label, key in enumerate(task.classes):
            stored = {float(v) for v in bank.images(key)[:, 0, 0, 0]}
            drawn = torch.cat(
                [task.support_x[task.support_y == label], task.query_x[task.query_y == label]]
            )[:, 0, 0, 0].tolist()
            assert set(drawn) <= stored and len(set(drawn)) == 4  # the label's own, no repeats
    assert mixed >= 15


def test_sampling_is_seeded() -> None:
    bank = MemoryBank(SHAPE)
    images, labels = _batch(6, 5, start=0)
    bank.add("t", images, labels)
    a = bank.sample_task(5, 2, 2, torch.Generator().manual_seed(3), CPU)
    b = bank.sample_task(5, 2, 2, torch.Generator().manual_seed(3), CPU)
    assert a.classes == b.classes and torch.equal(a.query_x, b.query_x)


def test_too_few_ready_classes_is_a_clear_error() -> None:
    bank = MemoryBank(SHAPE)
    images, labels = _batch(5, 3, start=0)
    bank.add("t", images, labels)
    with pytest.raises(MemoryBankError, match="needs 5 classes with 4 images"):
        bank.sample_task(5, 1, 3, torch.Generator(), CPU)


def test_wrong_image_shape_is_refused() -> None:
    bank = MemoryBank(SHAPE)
    with pytest.raises(MemoryBankError):
        bank.add("t", torch.zeros(2, 3, 2, 2), torch.zeros(2, dtype=torch.long))


def test_disk_bank_round_trips_as_npy_without_pickle(tmp_path: Path) -> None:
    root = tmp_path / "memory"
    bank = MemoryBank(SHAPE, MemoryConfig(capacity_per_class=4), root=root)
    for step in range(3):
        images, labels = _batch(3, 2, start=10 * step)
        bank.add("t", images, labels, class_names=("x", "y", "z"))
    reopened = MemoryBank.open(root)
    assert [c.key for c in reopened.classes] == [c.key for c in bank.classes]
    for pseudo, again in zip(bank.classes, reopened.classes, strict=True):
        assert torch.equal(reopened.images(again.key), bank.images(pseudo.key))
        assert again.sources == pseudo.sources
    files = {p.name for p in root.iterdir()}
    assert files == {INDEX_FILE, "class-000000.npy", "class-000001.npy", "class-000002.npy"}
    stored = np.load(root / "class-000000.npy", allow_pickle=False)
    assert stored.dtype == np.float16 and stored.shape == (4, *SHAPE)
    # Resuming keeps the FIFO going where it stopped.
    images, labels = _batch(3, 1, start=500)
    reopened.add("t", images, labels, class_names=("x", "y", "z"))
    assert reopened.images("name:x")[-1, 0, 0, 0].item() == pytest.approx(500 / 1024)
    assert json.loads((root / INDEX_FILE).read_text())["classes"][0]["size"] == 4


def test_disk_bank_refuses_to_overwrite_or_read_garbage(tmp_path: Path) -> None:
    MemoryBank(SHAPE, root=tmp_path)
    with pytest.raises(MemoryBankError, match="already holds"):
        MemoryBank(SHAPE, root=tmp_path)
    (tmp_path / INDEX_FILE).write_text("{not json")
    with pytest.raises(MemoryBankError, match="cannot read"):
        MemoryBank.open(tmp_path)


def test_disk_bank_index_cannot_point_outside_its_folder(tmp_path: Path) -> None:
    root = tmp_path / "bank"
    bank = MemoryBank(SHAPE, root=root)
    images, labels = _batch(1, 2, start=0)
    bank.add("t", images, labels)
    index = json.loads((root / INDEX_FILE).read_text())
    index["classes"][0]["file"] = "../class-000000.npy"
    (root / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(MemoryBankError, match="bad class file name"):
        MemoryBank.open(root)


def test_the_bank_keeps_at_most_max_classes_dropping_the_oldest() -> None:
    bank = MemoryBank(SHAPE, MemoryConfig(capacity_per_class=4, max_classes=3))
    images, labels = _batch(2, 2, start=0)
    for teacher in ("a", "b", "c"):
        bank.add(teacher, images, labels)
        assert len(bank.classes) <= 3
    assert [c.key for c in bank.classes] == ["b:1", "c:0", "c:1"]
    assert len(bank) == 3 * 2
    with pytest.raises(KeyError):
        bank.size("a:0")


def test_a_disk_bank_deletes_dropped_classes_and_never_reuses_a_file(tmp_path: Path) -> None:
    root = tmp_path / "memory"
    bank = MemoryBank(SHAPE, MemoryConfig(capacity_per_class=2, max_classes=2), root=root)
    images, labels = _batch(2, 1, start=0)
    bank.add("a", images, labels)
    bank.add("b", images, labels)  # a's two classes go, with their files
    assert {p.name for p in root.iterdir()} == {INDEX_FILE, "class-000002.npy", "class-000003.npy"}
    reopened = MemoryBank.open(root)
    assert reopened.config.max_classes == 2
    reopened.add("c", images[:1], labels[:1])
    assert {p.name for p in root.iterdir()} == {INDEX_FILE, "class-000003.npy", "class-000004.npy"}
    assert [c.key for c in reopened.classes] == ["b:1", "c:0"]
    assert torch.equal(reopened.images("c:0"), images[:1])
