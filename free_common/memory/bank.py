"""The task memory bank: recovered images per pseudo-class, and N-way K-shot tasks drawn from it.

Owners' label spaces are private and may overlap, so class identity is the pair
(teacher, class index): each pair is its own pseudo-class, unless owners declared
class names, in which case equal names are one pseudo-class across teachers. Each
pseudo-class keeps its newest `capacity_per_class` images (FIFO), and the bank keeps at
most `max_classes` pseudo-classes: a new one beyond that drops the oldest (first created)
with its images, so the bank does not grow with the pool of teachers. A task draws N
pseudo-classes uniformly from those with enough images, wherever they came from,
so tasks mix teachers ("interpolated" tasks, as in the official code).

Images are stored as given: (C, H, W) in [0, 1], the meta-learner's input format.
With no folder the bank lives in RAM; with one, each pseudo-class is a memory-mapped
.npy file and ``index.json`` records which is which, so `MemoryBank.open` resumes it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from free_common.durable import write_synced
from free_common.errors import ConfigError, MemoryBankError
from free_common.memory.config import MemoryConfig
from free_common.memory.episode import Episode
from free_common.memory.ring import Ring

__all__ = ["INDEX_FILE", "MemoryBank", "PseudoClass", "pseudo_class_key"]

INDEX_FILE = "index.json"
_FORMAT = "free-memory-bank"
_VERSION = 1
_FILE_RE = re.compile(r"class-[0-9]{6,}\.npy")


def pseudo_class_key(teacher_id: str, class_index: int, class_name: str | None) -> str:
    """Name of a pseudo-class: ``name:<class name>`` when declared, else ``<teacher>:<index>``."""
    return f"name:{class_name}" if class_name is not None else f"{teacher_id}:{class_index}"


@dataclass
class PseudoClass:
    """One class of the bank and where its images came from.

    Attributes
    ----------
    key
        Its name (`pseudo_class_key`).
    sources
        Every (teacher id, class index) that contributed images, in order of first add.
    """

    key: str
    sources: list[tuple[str, int]] = field(default_factory=list)

    @property
    def teacher_ids(self) -> set[str]:
        """Teachers this class holds images of."""
        return {teacher for teacher, _ in self.sources}


class MemoryBank:
    """Recovered images per pseudo-class, bounded FIFO per class.

    Parameters
    ----------
    image_shape
        (C, H, W) of every stored image.
    config
        Capacity per class, stored dtype, class-name rule.
    root
        Folder for an on-disk bank (created if missing; must not hold a bank already:
        use `MemoryBank.open` to resume one). None keeps the bank in RAM.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        config: MemoryConfig | None = None,
        root: Path | None = None,
    ) -> None:
        self.image_shape = (image_shape[0], image_shape[1], image_shape[2])
        self.config = config or MemoryConfig()
        self.root = root
        self._classes: dict[str, PseudoClass] = {}
        self._rings: dict[str, Ring] = {}
        self._files: dict[str, str] = {}
        self._next_file = 0
        self._stale: list[Path] = []
        if root is not None:
            if (root / INDEX_FILE).exists():
                raise MemoryBankError(
                    f"{root} already holds a memory bank; open it with MemoryBank.open "
                    "or choose an empty folder"
                )
            root.mkdir(parents=True, exist_ok=True)
            self._write_index()

    @classmethod
    def open(cls, root: Path) -> MemoryBank:
        """Reopen an on-disk bank written by this class.

        Raises
        ------
        MemoryBankError
            The folder has no readable index, or the index and files disagree.
        """
        try:
            index = json.loads((root / INDEX_FILE).read_text())
            if index.get("format") != _FORMAT or index.get("version") != _VERSION:
                raise ValueError("not a memory bank of this version")
            config = MemoryConfig(
                capacity_per_class=int(index["capacity_per_class"]),
                dtype=index["dtype"],
                merge_by_class_name=bool(index["merge_by_class_name"]),
                max_classes=int(index.get("max_classes", MemoryConfig.max_classes)),
            )
            channels, height, width = (int(v) for v in index["image_shape"])
            shape = (channels, height, width)
            bank = cls(shape, config)  # an empty RAM bank, then pointed at the files
            bank.root = root
            for entry in index["classes"]:
                key, file = str(entry["key"]), str(entry["file"])
                if _FILE_RE.fullmatch(file) is None:  # a plain name in root, nothing else
                    raise ValueError(f"bad class file name {file!r:.40}")
                ring = Ring.open_file(root / file, int(entry["size"]), int(entry["head"]))
                if ring.array.shape != (config.capacity_per_class, *shape):
                    raise ValueError(f"{file} has shape {ring.array.shape}")
                if ring.array.dtype != np.dtype(config.dtype):
                    raise ValueError(f"{file} holds {ring.array.dtype}, not {config.dtype}")
                sources = [(str(t), int(c)) for t, c in entry["sources"]]
                bank._classes[key] = PseudoClass(key, sources)
                bank._rings[key] = ring
                bank._files[key] = file
                bank._next_file = max(bank._next_file, int(file[6:-4]) + 1)
            bank._next_file = max(bank._next_file, int(index.get("next_file", 0)))
        except (OSError, ValueError, KeyError, TypeError, ConfigError) as err:
            raise MemoryBankError(
                f"cannot read the memory bank in {root} ({err}); start a fresh one"
            ) from None
        return bank

    @property
    def classes(self) -> list[PseudoClass]:
        """Pseudo-classes in order of creation."""
        return list(self._classes.values())

    def size(self, key: str) -> int:
        """Images held by pseudo-class `key`."""
        return self._rings[key].size

    def __len__(self) -> int:
        """Images held in all."""
        return sum(ring.size for ring in self._rings.values())

    def images(self, key: str) -> Tensor:
        """Images of pseudo-class `key`, oldest first, as float32: (n, C, H, W)."""
        return torch.from_numpy(self._rings[key].ordered().astype(np.float32))

    def add(
        self,
        teacher_id: str,
        images: Tensor,
        labels: Tensor,
        class_names: Sequence[str] = (),
    ) -> None:
        """Store one teacher's recovered images under their pseudo-classes.

        Parameters
        ----------
        teacher_id
            The teacher the images were recovered from.
        images
            (N, C, H, W) in [0, 1], any device.
        labels
            (N,) the teacher's class index of each image.
        class_names
            The teacher's declared class names (empty when none); used as pseudo-class
            names when `merge_by_class_name` is on.
        """
        if tuple(images.shape[1:]) != self.image_shape or images.shape[0] != labels.shape[0]:
            raise MemoryBankError(
                f"images {tuple(images.shape)} with labels {tuple(labels.shape)} do not fit a "
                f"bank of {self.image_shape} images"
            )
        stored = images.detach().to("cpu", torch.float32).numpy().astype(self.config.dtype)
        index = labels.detach().to("cpu").numpy()
        for class_index in np.unique(index).tolist():
            key = self._key(teacher_id, int(class_index), class_names)
            pseudo = self._classes.get(key)
            if pseudo is None:
                pseudo = self._new_class(key)
            if (teacher_id, class_index) not in pseudo.sources:
                pseudo.sources.append((teacher_id, class_index))
            self._rings[key].append(stored[index == class_index])
        if self.root is not None:
            self._write_index()

    def sample_task(
        self,
        ways: int,
        shots: int,
        queries: int,
        rng: torch.Generator,
        device: torch.device,
    ) -> Episode:
        """Draw an N-way K-shot Q-query task across the bank's pseudo-classes.

        Parameters
        ----------
        ways, shots, queries
            N classes; K support and Q query images per class (disjoint).
        rng
            CPU generator for the draw.
        device
            Where the returned tensors live.

        Returns
        -------
        Episode
            Labels 0..N-1 in the order the classes were drawn; images class by class.

        Raises
        ------
        MemoryBankError
            Fewer than `ways` pseudo-classes hold `shots + queries` images.
        """
        per_class = shots + queries
        ready = [key for key, ring in self._rings.items() if ring.size >= per_class]
        if len(ready) < ways:
            raise MemoryBankError(
                f"a {ways}-way task needs {ways} classes with {per_class} images each; the "
                f"memory has {len(ready)}: recover from more teachers first"
            )
        order = torch.randperm(len(ready), generator=rng)[:ways].tolist()
        chosen = [ready[i] for i in order]
        support, query = [], []
        for key in chosen:
            ring = self._rings[key]
            positions = torch.randperm(ring.size, generator=rng)[:per_class].numpy()
            drawn = torch.from_numpy(ring.take(positions).astype(np.float32))  # (K+Q, C, H, W)
            support.append(drawn[:shots])
            query.append(drawn[shots:])
        labels = torch.arange(ways)
        return Episode(
            support_x=torch.cat(support).to(device),  # (N*K, C, H, W)
            support_y=labels.repeat_interleave(shots).to(device),  # (N*K,)
            query_x=torch.cat(query).to(device),  # (N*Q, C, H, W)
            query_y=labels.repeat_interleave(queries).to(device),  # (N*Q,)
            classes=tuple(chosen),
        )

    def _key(self, teacher_id: str, class_index: int, class_names: Sequence[str]) -> str:
        name = None
        if self.config.merge_by_class_name and class_names:
            if not 0 <= class_index < len(class_names):
                raise MemoryBankError(
                    f"label {class_index} of teacher {teacher_id} has no declared class name"
                )
            name = class_names[class_index]
        return pseudo_class_key(teacher_id, class_index, name)

    def _new_class(self, key: str) -> PseudoClass:
        pseudo = PseudoClass(key)
        cfg = self.config
        while len(self._classes) >= cfg.max_classes:
            self._drop(next(iter(self._classes)))
        if self.root is None:
            ring = Ring.in_memory(cfg.capacity_per_class, self.image_shape, cfg.dtype)
        else:
            # Numbered files: keys hold owner-chosen names, which are no file names.
            file = f"class-{self._next_file:06d}.npy"  # matches _FILE_RE
            self._next_file += 1
            ring = Ring.create_file(
                self.root / file, cfg.capacity_per_class, self.image_shape, cfg.dtype
            )
            self._files[key] = file
        self._classes[key] = pseudo
        self._rings[key] = ring
        return pseudo

    def _drop(self, key: str) -> None:
        """Forget pseudo-class `key` and its images (its file goes with the next index)."""
        del self._classes[key]
        del self._rings[key]
        file = self._files.pop(key, None)
        if file is not None and self.root is not None:
            # The index written after this add no longer names the file; a crash before
            # then leaves a complete old index and the file it names.
            self._stale.append(self.root / file)

    def _write_index(self) -> None:
        assert self.root is not None
        index: dict[str, Any] = {
            "format": _FORMAT,
            "version": _VERSION,
            "image_shape": list(self.image_shape),
            "capacity_per_class": self.config.capacity_per_class,
            "dtype": self.config.dtype,
            "merge_by_class_name": self.config.merge_by_class_name,
            "max_classes": self.config.max_classes,
            "next_file": self._next_file,
            "classes": [
                {
                    "key": key,
                    "file": self._files[key],
                    "size": self._rings[key].size,
                    "head": self._rings[key].head,
                    "sources": [list(source) for source in pseudo.sources],
                }
                for key, pseudo in self._classes.items()
            ],
        }
        # Write then rename: a crash leaves the old index, never half of a new one.
        write_synced(
            self.root / INDEX_FILE, json.dumps(index, ensure_ascii=False, indent=1).encode()
        )
        for path in self._stale:
            path.unlink(missing_ok=True)
        self._stale.clear()
