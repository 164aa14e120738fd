"""Adapting an initialization to one few-shot task, with its settings chosen on the support set.

Every strategy ends in the whole network, the backbone's ``features`` and an N-way linear
head, so the result can be scored, or exported, like any classifier:

``finetune``        the whole network from the initialization's head (or, for another
                    number of ways, a head drawn afresh), plain gradient steps on the
                    support cross-entropy. The paper's protocol (`PAPER`) is this at 10
                    steps of lr 0.01, what `free_common.meta.evaluate` and `free-bench
                    run` measure.
``proto-finetune``  Proto-MAML (Triantafillou et al., 2020): the head set from the class
                    prototypes of the features, ``W_k = 2 c_k / t``, ``b_k = -|c_k|^2 / t``,
                    so its logits are the negative squared distances to the prototypes
                    (up to a term equal for every class) over a temperature ``t``; then
                    the whole network fine-tuned.
``linear-probe``    features frozen; that prototype head trained alone (logistic
                    regression on the support features).
``centroid``        features frozen; the nearest prototype (the prototype head, untrained).

Batch norm runs on batch statistics throughout, as FREE evaluates: support features on
the support batch, queries on the query batch.

`select` chooses among `Candidate` settings (a strategy, its steps and lr) from the support
set alone: with two or more images per class, k-fold (fold ``f`` holds out the ``f``-th
image of every class); with one, the network is fitted on the support images and scored
on shifted copies of them (a few pixels, edges repeated). Fine-tuning runs are scored at
each step count of the grid along one run. Ties go to the paper's setting (`PAPER`),
then to the candidate listed first. The queries of a task are never passed to `select`
or `fit`: `score_protocols` hands them only to `predict`, after the fit.

At 1 shot the shifted copies are views of the very images the network was fitted on, so
they favour settings that hold on to those images; they rank settings, they do not
estimate query accuracy.
"""

from __future__ import annotations

import copy
import itertools
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from free_common.errors import ConfigError
from free_common.meta.episodes import EpisodeLike, as_inputs
from free_common.meta.evaluate import confidence_interval
from free_common.meta.functional import Params, batch_stat_mode, call, detached_params
from free_common.meta.maml import adapt
from free_common.models.backbones import Backbone

__all__ = [
    "PAPER",
    "PROTOCOLS",
    "STRATEGIES",
    "Adapted",
    "Candidate",
    "Protocol",
    "ProtocolScore",
    "Selection",
    "SelectionConfig",
    "Strategy",
    "as_module",
    "candidates",
    "fit",
    "predict",
    "protocol_strategies",
    "prototype_head",
    "score_protocols",
    "select",
]

Strategy = Literal["finetune", "proto-finetune", "linear-probe", "centroid"]
STRATEGIES: tuple[Strategy, ...] = ("finetune", "proto-finetune", "linear-probe", "centroid")

Protocol = Literal["auto", "paper", "finetune", "proto-finetune", "linear-probe", "centroid"]
"""``auto``: strategy, steps and lr chosen on the support set; ``paper``: `PAPER` as is;
a strategy's name: that strategy, its steps and lr chosen on the support set."""
PROTOCOLS: tuple[Protocol, ...] = ("auto", "paper", *STRATEGIES)


@dataclass(frozen=True, order=True)
class Candidate:
    """One setting to adapt with: a strategy and its steps and lr (0 for ``centroid``)."""

    strategy: Strategy
    steps: int = 0
    lr: float = 0.0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown strategy {self.strategy!r}; use one of {STRATEGIES}")
        if self.strategy != "centroid" and (self.steps < 1 or not self.lr > 0):
            raise ConfigError(f"{self.strategy} needs at least 1 step and a positive lr")

    @property
    def label(self) -> str:
        """Return the setting as people read it, e.g. ``finetune 10 steps lr 0.01``."""
        if self.strategy == "centroid":
            return "centroid"
        return f"{self.strategy} {self.steps} steps lr {self.lr:g}"


PAPER = Candidate("finetune", 10, 0.01)
"""FREE's evaluation protocol: the whole network, 10 plain steps at lr 0.01."""


@dataclass(frozen=True)
class SelectionConfig:
    """The settings `select` chooses from, and how it holds support images out.

    The grids were chosen on meta-val tasks of the glyph benchmark and Fashion-MNIST
    train classes (`benchmarks/results/adaptation/`), never on meta-test.
    """

    # Tried in this order (the paper's setting first); a tie goes to the earlier one.
    strategies: tuple[Strategy, ...] = ("finetune", "proto-finetune", "linear-probe", "centroid")
    finetune_lrs: tuple[float, ...] = (0.01, 0.1)  # finetune and proto-finetune
    finetune_steps: tuple[int, ...] = (5, 10, 20)  # scored along one run of the longest
    probe_lrs: tuple[float, ...] = (0.01, 0.1)
    probe_steps: tuple[int, ...] = (10, 50, 100)
    folds: int = 3  # k-fold with at most this many folds (and no more than the shots)
    views: int = 4  # 1-shot: shifted copies of each support image to score on
    shift: int = 4  # 1-shot: largest shift of a copy, in pixels, each way
    seed: int = 0  # the copies' shifts, and any head drawn afresh

    def __post_init__(self) -> None:
        if not self.strategies or any(s not in STRATEGIES for s in self.strategies):
            raise ConfigError(f"strategies must be some of {', '.join(STRATEGIES)}")
        grids = (self.finetune_lrs, self.finetune_steps, self.probe_lrs, self.probe_steps)
        if not all(grids) or min(min(g) for g in grids) <= 0:
            raise ConfigError("the step and lr grids must be non-empty and positive")
        if self.folds < 1 or self.views < 1 or self.shift < 0:
            raise ConfigError("folds and views must be at least 1, shift at least 0")


def candidates(config: SelectionConfig, strategies: Iterable[Strategy]) -> list[Candidate]:
    """Return the grid of `config` for `strategies`, in the order `select` tries them."""
    wanted = set(strategies)
    grid: list[Candidate] = []
    for strategy in config.strategies:
        if strategy not in wanted:
            continue
        if strategy == "centroid":
            grid.append(Candidate("centroid"))
            continue
        probe = strategy == "linear-probe"
        lrs = config.probe_lrs if probe else config.finetune_lrs
        steps = config.probe_steps if probe else config.finetune_steps
        grid += [Candidate(strategy, s, lr) for lr in lrs for s in sorted(steps)]
    # Ties go to the paper's setting when the grid has it: a support set that cannot
    # tell settings apart keeps the protocol FREE was measured with.
    return sorted(grid, key=lambda c: c != PAPER)


@dataclass(frozen=True)
class Adapted:
    """A network adapted to one task: every parameter (the head N-way) and batch-norm buffers."""

    params: Params
    buffers: Params


@dataclass(frozen=True)
class Selection:
    """What `select` measured: each candidate's held-out accuracy, and how it held out.

    Attributes
    ----------
    scores
        Candidate -> mean held-out accuracy, in the order the candidates were tried.
    heldout
        ``"3-fold"`` (k-fold on the support images) or ``"4 shifted views"`` (1-shot).
    """

    scores: dict[Candidate, float]
    heldout: str

    def best(self, strategies: Iterable[Strategy] = STRATEGIES) -> Candidate:
        """Return the best-scoring candidate of `strategies` (the first tried among equals)."""
        wanted = set(strategies)
        pool = [(c, s) for c, s in self.scores.items() if c.strategy in wanted]
        if not pool:
            raise ConfigError(f"no candidate of {sorted(wanted)} was scored")
        return max(pool, key=lambda item: item[1])[0]  # max keeps the first of equals


def _backbone(model: nn.Module) -> Backbone:
    if not isinstance(model, Backbone):
        raise ConfigError(
            f"adaptation needs a backbone with features and a linear head, got"
            f" {type(model).__name__}"
        )
    return model


def _features(model: Backbone, params: Params, buffers: Params, x: Tensor) -> Tensor:
    """(B, C, H, W) images -> (B, D) features, on the batch's own statistics."""
    prefix = "features."
    own = {k[len(prefix) :]: v for k, v in {**params, **buffers}.items() if k.startswith(prefix)}
    out: Tensor = functional_call(model.features, own, (x,))
    return out


def prototype_head(
    features: Tensor, labels: Tensor, ways: int, margin: float = 4.0
) -> tuple[Tensor, Tensor]:
    """Return the prototype head ``(W, b)``: ``W_k = 2 c_k / t``, ``b_k = -|c_k|^2 / t``.

    ``c_k`` is the mean of the (S, D) `features` of class k, so ``W f + b = (|f|^2 - |f -
    c_k|^2) / t``: the nearest prototype has the largest logit. The temperature ``t`` puts
    the mean squared distance between two prototypes at `margin` logits. Without it
    (Proto-MAML's ``t = 1``) the logits of wide features are hundreds apart, the support
    loss is zero to float precision and fine-tuning from that head does not move.
    """
    onehot = F.one_hot(labels, ways).to(features.dtype)  # (S, N)
    counts = onehot.sum(0).clamp_min(1.0)  # (N,)
    prototypes = onehot.T @ features / counts[:, None]  # (N, D)
    gaps = torch.cdist(prototypes, prototypes) ** 2  # (N, N), zero diagonal
    spread = gaps.sum() / max(ways * (ways - 1), 1)
    temperature = (spread / margin).clamp_min(1e-6)
    return 2 * prototypes / temperature, -(prototypes**2).sum(1) / temperature


def _fresh_head(model: Backbone, ways: int, seed: int) -> tuple[Tensor, Tensor]:
    """Draw a head for `ways` classes from `seed`, as ``nn.Linear`` draws its own."""
    generator = torch.Generator().manual_seed(seed)
    bound = 1.0 / model.feature_dim**0.5  # nn.Linear: uniform in +-1/sqrt(fan_in)
    param = model.head.weight
    weight = torch.rand(ways, model.feature_dim, generator=generator, dtype=param.dtype)
    bias = torch.rand(ways, generator=generator, dtype=param.dtype)
    return (
        (weight * 2 - 1).mul(bound).to(param.device),
        (bias * 2 - 1).mul(bound).to(param.device),
    )


def _start(
    model: Backbone, x: Tensor, y: Tensor, ways: int, strategy: Strategy, seed: int
) -> tuple[Params, Params]:
    """Return the parameters and buffers `strategy` starts from on support `x`, labels `y`.

    ``finetune`` keeps the initialization's head when it has `ways` outputs and otherwise
    draws one from `seed`; the other strategies start from the prototype head.
    """
    params = detached_params(model)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    if strategy == "finetune":
        if ways != model.num_classes:
            weight, bias = _fresh_head(model, ways, seed)
            params["head.weight"] = weight.requires_grad_()
            params["head.bias"] = bias.requires_grad_()
        return params, buffers
    with torch.no_grad():
        weight, bias = prototype_head(_features(model, params, buffers, x), y, ways)
    params["head.weight"] = weight.requires_grad_()
    params["head.bias"] = bias.requires_grad_()
    return params, buffers


def _runs(
    model: Backbone,
    x: Tensor,
    y: Tensor,
    ways: int,
    strategy: Strategy,
    lr: float,
    seed: int,
) -> Iterator[Params]:
    """Yield the parameters after each step of `strategy` at `lr` (forever; take what you need).

    ``finetune`` and ``proto-finetune`` step the whole network exactly as the paper's
    protocol does (`free_common.meta.evaluate.finetune_accuracy`); ``linear-probe`` steps
    the head alone on features computed once.
    """
    params, buffers = _start(model, x, y, ways, strategy, seed)
    if strategy == "linear-probe":
        with torch.no_grad():
            feats = _features(model, params, buffers, x)  # (S, D)
        head = {k: params[k] for k in ("head.weight", "head.bias")}
        while True:
            loss = F.cross_entropy(F.linear(feats, head["head.weight"], head["head.bias"]), y)
            grads = torch.autograd.grad(loss, list(head.values()))
            head = {
                k: (p - lr * g).detach().requires_grad_()
                for (k, p), g in zip(head.items(), grads, strict=True)
            }
            yield {**params, **head}
    while True:
        # One step at a time, detached: first-order, and no graph grows across steps.
        params = adapt(model, params, x, y, 1, lr, False, buffers)
        params = {name: p.detach().requires_grad_() for name, p in params.items()}
        yield params


def fit(
    model: nn.Module,
    support_x: Tensor,
    support_y: Tensor,
    ways: int,
    candidate: Candidate,
    seed: int = 0,
) -> Adapted:
    """Adapt a copy of `model` to the support set with `candidate`; the model is left as it was.

    Parameters
    ----------
    model
        A `Backbone` (features and a linear head), on the device to adapt on.
    support_x, support_y
        (S, C, H, W) images (floats in [0, 1] or uint8) and (S,) labels in 0..ways-1.
    ways
        Classes of the task: the adapted head's outputs.
    candidate
        Strategy, steps and lr.
    seed
        Draws the head when ``finetune`` meets another number of ways than the model's.
    """
    backbone = _backbone(model)
    param = next(backbone.parameters())
    x = as_inputs(support_x, param.device, param.dtype)
    y = support_y.to(param.device)
    with batch_stat_mode(backbone):
        if candidate.strategy == "centroid":
            params, buffers = _start(backbone, x, y, ways, "centroid", seed)
        else:
            runs = _runs(backbone, x, y, ways, candidate.strategy, candidate.lr, seed)
            params = next(itertools.islice(runs, candidate.steps - 1, None))
            buffers = {name: b.clone() for name, b in backbone.named_buffers()}
    return Adapted({k: p.detach() for k, p in params.items()}, buffers)


def predict(model: nn.Module, adapted: Adapted, images: Tensor) -> Tensor:
    """(B, C, H, W) images -> (B, N) logits of the adapted network, on the batch's statistics."""
    param = next(model.parameters())
    return _logits(
        model, adapted.params, adapted.buffers, as_inputs(images, param.device, param.dtype)
    )


def as_module(model: nn.Module, adapted: Adapted) -> Backbone:
    """Return a new network of `model`'s architecture holding `adapted`'s weights (N-way head)."""
    network = copy.deepcopy(_backbone(model))
    ways, dim = adapted.params["head.weight"].shape
    network.head = nn.Linear(dim, ways).to(adapted.params["head.weight"])
    network.num_classes = ways
    network.load_state_dict({**adapted.params, **adapted.buffers})
    return network


@torch.no_grad()
def _logits(model: nn.Module, params: Params, buffers: Params, x: Tensor) -> Tensor:
    copies = {name: b.clone() for name, b in buffers.items()}  # batch norm writes its buffers
    with batch_stat_mode(model):
        return call(model, params, x, copies)


def _heldout(
    x: Tensor, y: Tensor, ways: int, config: SelectionConfig, rng: torch.Generator
) -> tuple[list[tuple[Tensor, Tensor, Tensor, Tensor]], str]:
    """Split the support set into (train x, train y, held-out x, held-out y) parts."""
    members = [torch.nonzero(y == c).flatten() for c in range(ways)]  # support rows per class
    fewest = min(len(m) for m in members)
    if fewest == 0:
        raise ConfigError("every class of the task needs at least one support image")
    if fewest >= 2:
        folds = min(config.folds, fewest)
        parts = []
        for fold in range(folds):
            out = torch.stack([m[fold] for m in members])  # (N,) one image per class
            keep = torch.ones(len(y), dtype=torch.bool)
            keep[out] = False
            parts.append((x[keep], y[keep], x[out], y[out]))
        return parts, f"{folds}-fold"
    views = _shifted(x, config.views, config.shift, rng)  # (V*S, C, H, W)
    return [(x, y, views, y.repeat(config.views))], f"{config.views} shifted views"


def _shifted(x: Tensor, views: int, shift: int, rng: torch.Generator) -> Tensor:
    """Return `views` copies of (S, C, H, W) images, each moved up to `shift` pixels each way."""
    side_h, side_w = x.shape[-2:]
    padded = F.pad(x, (shift, shift, shift, shift), mode="replicate")  # edges repeated
    copies = []
    for _ in range(views):
        for image in padded:
            top, left = (int(v) for v in torch.randint(0, 2 * shift + 1, (2,), generator=rng))
            copies.append(image[:, top : top + side_h, left : left + side_w])
    return torch.stack(copies)


def select(
    model: nn.Module,
    support_x: Tensor,
    support_y: Tensor,
    ways: int,
    config: SelectionConfig,
    strategies: Iterable[Strategy] = STRATEGIES,
) -> Selection:
    """Score every candidate of `strategies` on held-out support images (never queries).

    Raises
    ------
    ConfigError
        A class without support images, or no candidate to score.
    """
    backbone = _backbone(model)
    grid = candidates(config, strategies)
    if not grid:
        raise ConfigError(f"no candidate for {sorted(set(strategies))} in the selection grid")
    param = next(backbone.parameters())
    x = as_inputs(support_x, param.device, param.dtype)
    y = support_y.to(param.device)
    rng = torch.Generator().manual_seed(config.seed)
    parts, heldout = _heldout(x, y, ways, config, rng)
    totals: dict[Candidate, float] = dict.fromkeys(grid, 0.0)
    runs = sorted({(c.strategy, c.lr) for c in grid if c.strategy != "centroid"})
    for train_x, train_y, out_x, out_y in parts:
        for strategy, lr in runs:
            wanted = {c.steps: c for c in grid if (c.strategy, c.lr) == (strategy, lr)}
            run = _runs(backbone, train_x, train_y, ways, strategy, lr, config.seed)
            for step, params in enumerate(itertools.islice(run, max(wanted)), start=1):
                if step in wanted:
                    totals[wanted[step]] += _accuracy(backbone, params, out_x, out_y)
        if Candidate("centroid") in totals:
            params, _ = _start(backbone, train_x, train_y, ways, "centroid", config.seed)
            totals[Candidate("centroid")] += _accuracy(backbone, params, out_x, out_y)
    return Selection({c: total / len(parts) for c, total in totals.items()}, heldout)


def _accuracy(model: Backbone, params: Params, x: Tensor, y: Tensor) -> float:
    logits = _logits(model, params, dict(model.named_buffers()), x)  # (B, N)
    return float((logits.argmax(1) == y).float().mean())


@dataclass
class ProtocolScore:
    """One protocol's query accuracy over a set of tasks, and what it chose on each.

    Attributes
    ----------
    accuracies
        Query accuracy per task, in task order (the same tasks for every protocol).
    chosen
        Candidate label -> on how many tasks it was chosen.
    selection_scores
        Candidate label -> its mean held-out accuracy over the tasks (empty for ``paper``).
    heldout
        How the support set was held out (`Selection.heldout`; ``""`` for ``paper``).
    """

    accuracies: list[float] = field(default_factory=list)
    chosen: Counter[str] = field(default_factory=Counter)
    selection_scores: dict[str, float] = field(default_factory=dict)
    heldout: str = ""

    @property
    def mean(self) -> float:
        """Mean query accuracy."""
        return confidence_interval(self.accuracies)[0]

    @property
    def ci95(self) -> float:
        """Half-width of its 95% interval (1.96 std / sqrt(tasks))."""
        return confidence_interval(self.accuracies)[1]


def protocol_strategies(protocol: Protocol) -> tuple[Strategy, ...]:
    """Return the strategies a protocol chooses among (none for ``paper``)."""
    if protocol == "paper":
        return ()
    return STRATEGIES if protocol == "auto" else (protocol,)


def score_protocols(
    model: nn.Module,
    episodes: Iterable[EpisodeLike],
    ways: int,
    protocols: Sequence[Protocol],
    config: SelectionConfig,
    paper: Candidate = PAPER,
) -> dict[Protocol, ProtocolScore]:
    """Adapt `model` to each task with each protocol and score the task's queries.

    One `select` per task serves every protocol (each takes the best of its own
    strategies); the queries reach `predict` only, after the fit.

    Parameters
    ----------
    model
        The initialization (a `Backbone`), on the device to adapt on.
    episodes
        The tasks, each `ways`-way.
    protocols
        Which protocols to score.
    config
        The selection grid and held-out scheme; its seed, plus the task's index, seeds
        each task's shifted views and fresh heads.
    paper
        The ``paper`` protocol's setting (`PAPER`, or other steps and lr).
    """
    scores: dict[Protocol, ProtocolScore] = {p: ProtocolScore() for p in protocols}
    wanted = sorted({s for p in protocols for s in protocol_strategies(p)})
    sums: dict[Candidate, float] = {}
    for index, episode in enumerate(episodes):
        # Each task its own seed (shifted views, fresh heads), the same for every protocol.
        task_config = replace(config, seed=config.seed * 1_000_003 + index)
        selection = None
        if wanted:
            selection = select(model, episode.support_x, episode.support_y, ways, task_config)
            for candidate, value in selection.scores.items():
                sums[candidate] = sums.get(candidate, 0.0) + value
        fits: dict[Candidate, float] = {}  # protocols that chose the same setting share its fit
        for protocol, score in scores.items():
            if protocol == "paper" or selection is None:
                candidate = paper
            else:
                candidate = selection.best(protocol_strategies(protocol))
                score.heldout = selection.heldout
            if candidate not in fits:
                adapted = fit(
                    model, episode.support_x, episode.support_y, ways, candidate, task_config.seed
                )
                logits = predict(model, adapted, episode.query_x)  # (N*Q, N)
                query_y = episode.query_y.to(logits.device)
                fits[candidate] = float((logits.argmax(1) == query_y).float().mean())
            score.accuracies.append(fits[candidate])
            score.chosen[candidate.label] += 1
    tasks = max((len(s.accuracies) for s in scores.values()), default=0)
    for protocol, score in scores.items():
        if protocol != "paper" and tasks:
            allowed = set(protocol_strategies(protocol))
            score.selection_scores = {
                c.label: total / tasks for c, total in sums.items() if c.strategy in allowed
            }
    return scores
