"""Scores of a membership test: ROC AUC, TPR at a low FPR, and their confidence intervals.

A test gives each candidate image a score, higher meaning "more likely a training
image". Its advantage is read from the ROC curve over members and non-members: the
area under it (0.5: no better than a coin) and the true-positive rate at a 1 % false-
positive rate (Carlini et al., "Membership inference attacks from first principles",
S&P 2022, argue that the low-FPR corner is what matters for privacy).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Advantage", "advantage", "mean_ci95", "roc_auc", "tpr_at_fpr"]


def roc_auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """Probability that a random member scores above a random non-member (ties count half)."""
    m = np.asarray(members, dtype=np.float64).ravel()
    n = np.asarray(nonmembers, dtype=np.float64).ravel()
    if not len(m) or not len(n):
        return math.nan
    ranks = _ranks(np.concatenate([m, n]))
    # Mann-Whitney U of the members over the pooled ranks.
    u = ranks[: len(m)].sum() - len(m) * (len(m) + 1) / 2
    return float(u / (len(m) * len(n)))


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their mean rank."""
    order = values.argsort(kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    unique, inverse = np.unique(values, return_inverse=True)
    sums = np.bincount(inverse, weights=ranks, minlength=len(unique))
    counts = np.bincount(inverse, minlength=len(unique))
    return np.asarray((sums / counts)[inverse])


def tpr_at_fpr(members: np.ndarray, nonmembers: np.ndarray, fpr: float = 0.01) -> float:
    """Share of members flagged by the strictest threshold that flags at most `fpr` of non-members.

    With fewer than 1 / `fpr` non-members that threshold flags none of them: the figure
    is then the TPR at zero false positives (members scoring above every non-member).
    """
    m = np.asarray(members, dtype=np.float64).ravel()
    n = np.sort(np.asarray(nonmembers, dtype=np.float64).ravel())[::-1]
    if not len(m) or not len(n):
        return math.nan
    allowed = math.floor(fpr * len(n))  # non-members the threshold may let through
    threshold = n[allowed] if allowed < len(n) else -math.inf
    return float((m > threshold).mean())


@dataclass(frozen=True)
class Advantage:
    """The advantage of one membership test, with bootstrap 95 % intervals."""

    auc: float
    auc_ci: tuple[float, float]
    tpr_at_1fpr: float
    tpr_ci: tuple[float, float]
    members: int
    nonmembers: int


def advantage(
    members: np.ndarray, nonmembers: np.ndarray, resamples: int = 200, seed: int = 0
) -> Advantage:
    """AUC and TPR at 1 % FPR of scores, each with a percentile bootstrap 95 % interval.

    Members and non-members are resampled apart (a stratified bootstrap), so every
    resample keeps the two counts.
    """
    m = np.asarray(members, dtype=np.float64).ravel()
    n = np.asarray(nonmembers, dtype=np.float64).ravel()
    rng = np.random.default_rng(seed)
    aucs, tprs = [], []
    for _ in range(resamples):
        bm = m[rng.integers(0, len(m), len(m))]
        bn = n[rng.integers(0, len(n), len(n))]
        aucs.append(roc_auc(bm, bn))
        tprs.append(tpr_at_fpr(bm, bn))
    return Advantage(
        auc=roc_auc(m, n),
        auc_ci=_interval(aucs),
        tpr_at_1fpr=tpr_at_fpr(m, n),
        tpr_ci=_interval(tprs),
        members=len(m),
        nonmembers=len(n),
    )


def _interval(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return (math.nan, math.nan)
    low, high = np.percentile(np.asarray(values), [2.5, 97.5])
    return (float(low), float(high))


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its normal 95 % interval (0 for a single value)."""
    data = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if not len(data):
        return (math.nan, math.nan)
    half = 1.96 * data.std(ddof=1) / math.sqrt(len(data)) if len(data) > 1 else 0.0
    return (float(data.mean()), float(half))
