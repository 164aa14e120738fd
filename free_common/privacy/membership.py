"""Membership inference: whether a model tells an owner's training images from unseen ones.

The attack is the loss attack of Yeom et al. ("Privacy risk in machine learning:
analyzing the connection to overfitting", IEEE CSF 2018): an image scores higher the
lower the model's cross-entropy on its true label, a training image being fitted better
than an unseen one. The score is the logit-scaled confidence ``log(p / (1 - p))`` of the
true label (Carlini et al., S&P 2022), a monotone function of the loss that orders the
images the same way but stays distinct where a confident model's loss underflows to 0.
It needs no shadow models; LiRA (Carlini et al., S&P 2022) calibrates the same score
per example with shadow models trained with and without it, which costs dozens of
trainings per owner and is left out here.

- On a submitted model (`model_scores`): the model's own logits. This is the upper
  bound: the operator, and anyone who gets the file, holds the model.
- On a release (`release_scores`): a release is a meta-learned initialization with no
  head for the owner's classes. It is scored the way an owner starts adapting it, by
  the prototype head (`free_common.meta.adaptation`'s ``prototype`` strategy, no
  fine-tuning steps): logits are minus the squared distance of the release's
  penultimate features to each class's mean feature. Each image's prototypes leave
  that image out and are taken over members and non-members alike, so only the
  release's features can tell the two apart.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from free_common.errors import ConfigError
from free_common.privacy.audit import OwnerImages

__all__ = ["ATTACK", "batch_features", "confidence", "model_scores", "release_scores"]

ATTACK = (
    "loss attack (Yeom et al., IEEE CSF 2018), scored by the true label's logit-scaled "
    "confidence log(p / (1 - p)), a monotone function of its cross-entropy"
)

Scores = tuple[np.ndarray, np.ndarray]
"""Member scores and non-member scores, higher meaning "more likely a member"."""


def model_scores(logits: Callable[[Tensor], Tensor], owner: OwnerImages) -> Scores:
    """Loss-attack scores of a classifier: `logits` maps images as `owner` holds them."""
    with torch.no_grad():
        members = confidence(logits(owner.members), owner.member_labels)
        nonmembers = confidence(logits(owner.nonmembers), owner.nonmember_labels)
    return members.numpy(), nonmembers.numpy()


def confidence(logits: Tensor, labels: Tensor) -> Tensor:
    """``log(p_y / (1 - p_y))`` of (B, K) logits: the true logit minus the others' logsumexp."""
    labels = labels.long()
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf")).logsumexp(1)
    return true - others


def batch_features(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """Return the release's penultimate features, batch norm on each call's batch statistics.

    Evaluation adapts with batch statistics (DESIGN.md section 4); a copy is used, so
    the release's running statistics are not touched.
    """
    frozen = copy.deepcopy(model).train()
    extract = frozen.features
    if not isinstance(extract, nn.Module):
        raise ConfigError("the release has no feature extractor (a `features` module)")

    def features(images: Tensor) -> Tensor:
        with torch.no_grad():
            out: Tensor = extract(images)
        return out.flatten(1)

    return features


def release_scores(features: Callable[[Tensor], Tensor], owner: OwnerImages) -> Scores:
    """Loss-attack scores of a release through its leave-one-out prototype head."""
    images = torch.cat([owner.members, owner.nonmembers])
    labels = torch.cat([owner.member_labels, owner.nonmember_labels]).long()
    embedded = features(images)  # (N, D)
    classes = int(labels.max()) + 1
    onehot = F.one_hot(labels, classes).float()  # (N, K)
    sums = onehot.T @ embedded  # (K, D)
    counts = onehot.sum(0)  # (K,)
    # Each image's own class prototype leaves it out; the other classes' keep all.
    own = (sums[labels] - embedded) / (counts[labels] - 1).clamp_min(1)[:, None]
    prototypes = (sums / counts.clamp_min(1)[:, None]).expand(len(images), -1, -1).clone()
    prototypes[torch.arange(len(images)), labels] = own
    logits = -((embedded[:, None, :] - prototypes) ** 2).sum(-1)  # (N, K)
    scores = confidence(logits, labels).numpy()
    count = len(owner.members)
    return scores[:count], scores[count:]
