"""Teacher zoo: simulated data owners, one classifier per random class subset.

Each teacher draws its own `ways` classes from the meta-train split (seeded by
the zoo seed and the teacher's index, so label spaces of different teachers
overlap, as in the paper), trains on the first 80 % of each class's images,
keeps the weights with the best accuracy on the held-out 20 %, and is exported
the way an owner would export it: ``<name>.onnx`` (BatchNorm kept, task metadata
in metadata_props) and ``<name>.json`` (classes, input shape, normalization,
held-out accuracy) side by side at the top of the output folder, with the
safetensors weights under ``checkpoints/``.

``--arch mix`` cycles Conv4, ResNet-10 and the MLP with different input sizes,
so one zoo holds heterogeneous teachers. ``--mix SPEC`` says exactly which: a JSON or
TOML file of teacher groups (architecture, width, classes, input side, count) and
whether label spaces are disjoint (`read_mix_spec`, `docs/zoo-mix.md`).

With a `DpConfig` each teacher trains with DP-SGD (`free_common.privacy.dp`) as the
batch-norm-free ``conv4gn`` and its metadata carries the epsilon and delta spent. Every
record lists the indices (into the meta-train split) of the images it trained on and of
those it held out, so the privacy audit knows members from non-members
(`training_split` replays the draw for zoos built before the indices were recorded).
"""

from __future__ import annotations

import itertools
import json
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from free_common.data.episodes import to_tensor
from free_common.data.imageset import ImageSet
from free_common.durable import write_synced
from free_common.errors import ConfigError, DataError, SplitError
from free_common.models.backbones import BACKBONES, Backbone, build_backbone
from free_common.models.checkpoint import save_checkpoint
from free_common.models.export import to_onnx
from free_common.models.metadata import task_to_dict
from free_common.privacy.dp import DP_BACKBONES, DpConfig, DpResult, train_private
from free_common.types import ChannelOrder, DpGuarantee, TaskMetadata

__all__ = [
    "ZOO_ARCHS",
    "MixGroup",
    "MixSpec",
    "TeacherPlan",
    "TeacherRecord",
    "ZooConfig",
    "read_mix_spec",
    "teacher_plan",
    "teacher_plans",
    "train_teacher",
    "train_zoo",
    "training_split",
]

ZOO_ARCHS = ("conv4", "conv4gn", "resnet", "mlp", "mix")
_SINGLE = {"conv4": "conv4", "conv4gn": "conv4gn", "resnet": "resnet10", "mlp": "mlp"}
_MIX = ("conv4", "resnet10", "mlp")
# Input side of each architecture in a mixed zoo, relative to the data's own side.
_MIX_SCALE = {"conv4": 1.0, "resnet10": 1.25, "mlp": 0.75}


@dataclass(frozen=True)
class MixGroup:
    """`count` teachers of one architecture, width, label count and input side.

    ``image_size`` None keeps the data's own side; ``width`` None the backbone's default.
    """

    arch: str
    count: int
    ways: int = 5
    image_size: int | None = None
    width: int | None = None

    def __post_init__(self) -> None:
        if self.arch not in BACKBONES:
            raise ConfigError(
                f"mix spec: unknown architecture {self.arch!r}; use one of {', '.join(BACKBONES)}"
            )
        if self.count < 1 or self.ways < 2:
            raise ConfigError(f"mix spec: group {self.arch} needs count >= 1 and ways >= 2")
        if self.image_size is not None and self.image_size < 16:
            raise ConfigError(f"mix spec: image_size must be at least 16, got {self.image_size}")
        if self.width is not None and self.width < 1:
            raise ConfigError(f"mix spec: width must be positive, got {self.width}")


@dataclass(frozen=True)
class MixSpec:
    """A heterogeneous zoo: its groups, and whether teachers share no class.

    Teachers are laid out round-robin over the groups (teacher 0 from the first group,
    1 from the second, ...), so any prefix of the zoo by name is mixed too.
    """

    groups: tuple[MixGroup, ...]
    disjoint: bool = True

    @property
    def models(self) -> int:
        """Number of teachers the spec describes."""
        return sum(g.count for g in self.groups)


_MIX_KEYS = {"arch", "count", "ways", "image_size", "width"}


def read_mix_spec(path: Path) -> MixSpec:
    """Read a mix spec from ``.json`` or ``.toml``: ``{"disjoint": bool, "groups": [...]}``.

    Raises
    ------
    ConfigError
        Unreadable file, unknown keys or values out of range; the message names the fix.
    """
    try:
        text = path.read_text()
        raw = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except OSError as err:
        raise ConfigError(f"cannot read the mix spec {path}: {err.strerror}") from None
    except (ValueError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(
            f"the mix spec {path} is not valid {path.suffix[1:] or 'JSON'}: {err}"
        ) from None
    groups = raw.get("groups") if isinstance(raw, dict) else None
    if not isinstance(groups, list) or not groups:
        raise ConfigError(f"the mix spec {path} needs a non-empty list 'groups' (docs/zoo-mix.md)")
    parsed = []
    for index, group in enumerate(groups):
        if not isinstance(group, dict) or set(group) - _MIX_KEYS or "arch" not in group:
            raise ConfigError(
                f"mix spec group {index} must be a table with 'arch', 'count' and optionally "
                f"{', '.join(sorted(_MIX_KEYS - {'arch', 'count'}))}"
            )
        try:
            parsed.append(MixGroup(**group))
        except TypeError as err:
            raise ConfigError(f"mix spec group {index}: {err}") from None
    return MixSpec(tuple(parsed), bool(raw.get("disjoint", True)))


@dataclass(frozen=True)
class TeacherPlan:
    """What teacher `index` of a zoo is: architecture, width, label count, input side."""

    arch: str
    width: int
    ways: int
    side: int


@dataclass(frozen=True)
class ZooConfig:
    """How to build a zoo.

    Attributes
    ----------
    models
        Number of teachers.
    arch
        ``conv4``, ``resnet`` (ResNet-10), ``mlp`` or ``mix``.
    ways
        Classes per teacher.
    epochs
        Training epochs per teacher (the best held-out epoch is kept).
    batch_size
        Training batch size.
    lr
        Learning rate; None picks the architecture's recipe (Adam 0.01 for Conv4 as
        in the FREE code, SGD 0.01 with momentum for ResNets, Adam 1e-3 for the MLP).
    holdout
        Fraction of each class's images held out for checkpoint selection.
    seed
        Seeds class draws, splits, initialization and training order.
    class_names
        Declare class names in the metadata (owners who share names share classes).
    mix
        A heterogeneous zoo's groups (`read_mix_spec`); it overrides `arch` and `ways`.
    dp
        Train every teacher with DP-SGD to this target (Conv4 zoos: as ``conv4gn``).
    """

    models: int
    arch: str = "conv4"
    ways: int = 5
    epochs: int = 20
    batch_size: int = 32
    lr: float | None = None
    holdout: float = 0.2
    seed: int = 0
    class_names: bool = True
    mix: MixSpec | None = None
    dp: DpConfig | None = None

    def __post_init__(self) -> None:
        if self.arch not in ZOO_ARCHS:
            raise ConfigError(f"unknown zoo architecture {self.arch!r}; use {', '.join(ZOO_ARCHS)}")
        if self.models < 1 or self.ways < 2 or self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("models, epochs and batch size must be positive and ways at least 2")
        if not 0.0 < self.holdout < 1.0:
            raise ConfigError(f"holdout must be between 0 and 1; got {self.holdout}")
        if self.mix is not None and self.mix.models != self.models:
            raise ConfigError(
                f"the mix spec describes {self.mix.models} teachers but {self.models} were asked "
                "for: leave --models out with --mix, or make them agree"
            )
        if self.dp is not None and (self.mix is not None or self.arch not in DP_BACKBONES):
            raise ConfigError(
                "DP teachers are Conv4 (trained as the batch-norm-free conv4gn): use --arch "
                "conv4 without --mix with --dp-epsilon"
            )


@dataclass(frozen=True)
class TeacherRecord:
    """What ``<name>.json`` says about one teacher."""

    name: str
    arch: str
    width: int
    classes: tuple[int, ...]
    """Meta-train labels of the teacher's classes, in logit order."""
    class_names: tuple[str, ...]
    task: dict[str, Any]
    heldout_accuracy: float
    best_epoch: int
    train_images: int
    heldout_images: int
    seed: int
    train_seconds: float
    train_indices: tuple[int, ...] = ()
    """Indices into the meta-train split of the images it trained on (its members)."""
    heldout_indices: tuple[int, ...] = ()
    """Indices of its classes' images it never trained on (checkpoint selection only)."""
    dp_epsilon: float | None = None
    """Epsilon Opacus's accountant reports for its DP-SGD training; None without DP."""
    dp_delta: float | None = None


def teacher_plan(config: ZooConfig, index: int, image_side: int) -> tuple[str, int]:
    """Architecture and input side of teacher `index` in a zoo without a mix spec."""
    if config.dp is not None:
        return DP_BACKBONES[config.arch], image_side
    if config.arch != "mix":
        return _SINGLE[config.arch], image_side
    arch = _MIX[index % len(_MIX)]
    return arch, max(16, round(image_side * _MIX_SCALE[arch]))


def teacher_plans(config: ZooConfig, image_side: int) -> list[TeacherPlan]:
    """Every teacher of the zoo, in index order (the mix spec's round-robin when given)."""
    if config.mix is None:
        plans = []
        for index in range(config.models):
            arch, side = teacher_plan(config, index, image_side)
            plans.append(TeacherPlan(arch, BACKBONES[arch].default_width, config.ways, side))
        return plans
    left = [g.count for g in config.mix.groups]
    plans = []
    while any(left):
        for position, group in enumerate(config.mix.groups):
            if left[position]:
                left[position] -= 1
                width = BACKBONES[group.arch].default_width if group.width is None else group.width
                plans.append(
                    TeacherPlan(group.arch, width, group.ways, group.image_size or image_side)
                )
    return plans


def _disjoint_draws(
    config: ZooConfig, plans: list[TeacherPlan], num_classes: int
) -> list[np.ndarray] | None:
    """Disjoint chunks of one seeded permutation of the classes, when the mix spec asks."""
    if config.mix is None or not config.mix.disjoint:
        return None
    needed = sum(plan.ways for plan in plans)
    if needed > num_classes:
        raise SplitError(
            f"the mix spec's {len(plans)} teachers need {needed} disjoint classes but the split "
            f"has {num_classes}: lower the counts or ways, or set disjoint = false"
        )
    order = np.random.default_rng([config.seed, 1_000_003]).permutation(num_classes)
    cuts = np.cumsum([0] + [plan.ways for plan in plans])
    return [order[start:end] for start, end in itertools.pairwise(cuts)]


def _split_indices(
    data: ImageSet, classes: np.ndarray, holdout: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train and held-out indices into `data`, with labels 0..ways-1 in `classes` order."""
    train_idx, train_y, held_idx, held_y = [], [], [], []
    for position, label in enumerate(classes):
        members = rng.permutation(np.flatnonzero(data.labels == label))
        held = max(1, round(len(members) * holdout))
        if len(members) - held < 1:
            raise SplitError(
                f"class {data.class_names[label]!r} has {len(members)} image(s); a teacher needs "
                "at least 2 per class (one to train, one to hold out)"
            )
        cut = len(members) - held
        train_idx.append(members[:cut])
        held_idx.append(members[cut:])
        train_y.append(np.full(cut, position))
        held_y.append(np.full(held, position))
    return (
        np.concatenate(train_idx),
        np.concatenate(train_y),
        np.concatenate(held_idx),
        np.concatenate(held_y),
    )


def _draw(
    config: ZooConfig, index: int, ways: int, num_classes: int, disjoint: list[np.ndarray] | None
) -> tuple[np.ndarray, np.random.Generator]:
    """Teacher `index`'s classes and the generator its split then draws from."""
    rng = np.random.default_rng([config.seed, index])
    if disjoint is None:
        return rng.choice(num_classes, ways, replace=False), rng
    return disjoint[index], rng


def training_split(data: ImageSet, record: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Return the indices into `data` (meta-train) of a teacher's training and held-out images.

    Zoos record them (``train_indices``, ``heldout_indices``); for one built before they
    did, the draw is replayed from the record's seed (Conv4-style zoo without a mix spec,
    20 % held out) and checked against its classes and image counts.

    Raises
    ------
    DataError
        The replay does not give the record's classes and counts (another data set, or
        a zoo built with other settings).
    """
    name = str(record.get("name", "?"))
    if record.get("train_indices"):
        train_idx = np.asarray(record["train_indices"], dtype=np.int64)
        held_idx = np.asarray(record.get("heldout_indices") or [], dtype=np.int64)
        both = np.concatenate([train_idx, held_idx])
        if (
            both.min() < 0
            or both.max() >= len(data)
            or not set(data.labels[both].tolist()) <= {int(c) for c in record.get("classes", [])}
        ):
            raise DataError(
                f"the training images {name} records are not in this data set: pass the "
                "meta-train split its zoo was built on"
            )
        return train_idx, held_idx
    try:
        index = int(name.split("-")[1])
        zoo_seed, remainder = divmod(int(record["seed"]) - index, 100_003)
        classes = [int(c) for c in record["classes"]]
        config = ZooConfig(models=index + 1, ways=len(classes), seed=zoo_seed)
    except (IndexError, ValueError, KeyError, TypeError, ConfigError):
        raise DataError(f"zoo record {name} says too little to find its training images") from None
    drawn, rng = _draw(config, index, len(classes), data.num_classes, None)
    if remainder or [int(c) for c in drawn] != classes:
        raise DataError(
            f"cannot replay the training split of {name}: rebuild the zoo with this "
            "free-bench (it records the indices) or pass the meta-train split it was built on"
        )
    train_idx, _, held_idx, _ = _split_indices(data, drawn, config.holdout, rng)
    if (len(train_idx), len(held_idx)) != (record["train_images"], record["heldout_images"]):
        raise DataError(f"the replayed split of {name} does not match its image counts")
    return train_idx, held_idx


def _images(data: ImageSet, indices: np.ndarray, side: int) -> torch.Tensor:
    """Float ``[N, C, side, side]`` images in [0, 1], resized when `side` differs."""
    images = to_tensor(data.images[indices])
    if images.shape[-1] != side or images.shape[-2] != side:
        images = F.interpolate(images, size=(side, side), mode="bilinear", antialias=True)
        images = images.clamp_(0.0, 1.0)
    return images


def _optimizer(arch: str, model: nn.Module, lr: float | None) -> torch.optim.Optimizer:
    if arch.startswith("resnet"):
        return torch.optim.SGD(model.parameters(), lr=lr or 0.01, momentum=0.9, weight_decay=5e-4)
    return torch.optim.Adam(model.parameters(), lr=lr or (0.01 if arch == "conv4" else 1e-3))


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train_teacher(
    plan: TeacherPlan,
    train: tuple[torch.Tensor, torch.Tensor],
    heldout: tuple[torch.Tensor, torch.Tensor],
    config: ZooConfig,
    seed: int,
) -> tuple[Backbone, float, int]:
    """Train one classifier of `plan` on normalized images; keep the best held-out epoch.

    Returns
    -------
    tuple
        The model (eval mode, best weights), its held-out accuracy and the best epoch.
    """
    x, y = train
    torch.manual_seed(seed)
    model = build_backbone(plan.arch, plan.ways, x.shape[1], x.shape[-1], width=plan.width)
    optimizer = _optimizer(plan.arch, model, config.lr)
    order = torch.Generator().manual_seed(seed)
    best = (-1.0, 0, {k: v.clone() for k, v in model.state_dict().items()})
    for epoch in range(1, config.epochs + 1):
        model.train()
        permutation = torch.randperm(len(x), generator=order)
        for start in range(0, len(x), config.batch_size):
            batch = permutation[start : start + config.batch_size]
            if len(batch) < 2:  # BatchNorm needs two samples to estimate a variance
                continue
            optimizer.zero_grad()
            torch.autograd.backward(F.cross_entropy(model(x[batch]), y[batch]))
            nn.utils.clip_grad_norm_(model.parameters(), 50.0)
            optimizer.step()
        accuracy = _accuracy(model, *heldout)
        if accuracy > best[0]:
            best = (accuracy, epoch, {k: v.clone() for k, v in model.state_dict().items()})
    model.load_state_dict(best[2])
    return model.eval(), best[0], best[1]


def train_zoo(
    data: ImageSet,
    out: Path,
    config: ZooConfig,
    on_teacher: Callable[[TeacherRecord], None] | None = None,
) -> list[TeacherRecord]:
    """Train and export `config.models` teachers on the meta-train images `data`.

    Parameters
    ----------
    data
        The meta-train split.
    out
        Output folder (created); ``<name>.onnx`` and ``<name>.json`` go to its top.
    config
        Zoo settings.
    on_teacher
        Called after each teacher is written (progress).

    Returns
    -------
    list of TeacherRecord
        One per teacher, in order.

    Raises
    ------
    SplitError
        Fewer classes than `config.ways`, or a class with fewer than 2 images.
    """
    side = data.image_size[0]
    plans = teacher_plans(config, side)
    most = max(plan.ways for plan in plans)
    if data.num_classes < most:
        raise SplitError(
            f"the split has {data.num_classes} classes; a {most}-way teacher needs at least {most}"
        )
    disjoint = _disjoint_draws(config, plans, data.num_classes)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    records = []
    for index, plan in enumerate(plans):
        seed = config.seed * 100_003 + index
        classes, rng = _draw(config, index, plan.ways, data.num_classes, disjoint)
        arch, teacher_side = plan.arch, plan.side
        train_idx, train_y, held_idx, held_y = _split_indices(data, classes, config.holdout, rng)
        raw_train = _images(data, train_idx, teacher_side)
        # Each owner normalizes with the statistics of its own training images.
        mean = tuple(round(float(v), 4) for v in raw_train.mean(dim=(0, 2, 3)))
        std = tuple(max(round(float(v), 4), 1e-3) for v in raw_train.std(dim=(0, 2, 3)))
        shift = torch.tensor(mean).view(1, -1, 1, 1)
        scale = torch.tensor(std).view(1, -1, 1, 1)
        names = tuple(data.class_names[c] for c in classes)
        task = TaskMetadata(
            num_classes=plan.ways,
            input_shape=(data.channels, teacher_side, teacher_side),
            channel_order=ChannelOrder.GRAY if data.channels == 1 else ChannelOrder.RGB,
            mean=mean,
            std=std,
            class_names=names if config.class_names else (),
        )
        started = time.perf_counter()
        train = ((raw_train - shift) / scale, torch.from_numpy(train_y))
        heldout = (
            (_images(data, held_idx, teacher_side) - shift) / scale,
            torch.from_numpy(held_y),
        )
        spent: DpResult | None = None
        if config.dp is None:
            model, accuracy, best_epoch = train_teacher(plan, train, heldout, config, seed)
        else:
            torch.manual_seed(seed)
            model = build_backbone(plan.arch, plan.ways, data.channels, teacher_side,
                                   width=plan.width)  # fmt: skip
            spent = train_private(model, train, heldout, config.epochs, config.dp, seed)
            accuracy, best_epoch = spent.heldout_accuracy, spent.best_epoch
        suffix = "" if plan.width == BACKBONES[arch].default_width else f"-w{plan.width}"
        name = f"teacher-{index:03d}-{arch}{suffix}"
        width = plan.width
        guarantee = None if spent is None else DpGuarantee(spent.epsilon, spent.delta)
        write_synced(out / f"{name}.onnx", to_onnx(model, task, dp=guarantee))
        save_checkpoint(out / "checkpoints" / f"{name}.safetensors", model, arch=arch,
                        width=width, task=task)  # fmt: skip
        record = TeacherRecord(
            name=name,
            arch=arch,
            width=width,
            classes=tuple(int(c) for c in classes),
            class_names=names,
            task=task_to_dict(task),
            heldout_accuracy=accuracy,
            best_epoch=best_epoch,
            train_images=len(train_idx),
            heldout_images=len(held_idx),
            seed=seed,
            train_seconds=round(time.perf_counter() - started, 3),
            train_indices=tuple(int(i) for i in train_idx),
            heldout_indices=tuple(int(i) for i in held_idx),
            dp_epsilon=None if spent is None else round(spent.epsilon, 4),
            dp_delta=None if spent is None else spent.delta,
        )
        text = json.dumps(asdict(record), indent=2, ensure_ascii=False) + "\n"
        write_synced(out / f"{name}.json", text.encode())
        records.append(record)
        if on_teacher is not None:
            on_teacher(record)
    return records
