"""The batch-norm statistics prior: zero on the owner's statistics, a gradient towards them."""

from __future__ import annotations

import torch
from torch import nn

from free_common.inversion.bn_prior import BatchNormPrior


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
    net.eval()
    return net


def test_the_prior_is_the_distance_of_batch_statistics_to_the_running_ones() -> None:
    net = _net()
    bn = net[1]
    x = torch.rand(8, 1, 5, 5)
    with torch.no_grad():
        h = net[0](x)
    bn.running_mean.copy_(h.mean((0, 2, 3)))
    bn.running_var.copy_(h.var((0, 2, 3), unbiased=False))
    with BatchNormPrior(net) as prior:
        net(x)
    assert float(prior.loss()) < 1e-6
    bn.running_mean.add_(torch.tensor([3.0, 0.0, 0.0, 4.0]))
    with BatchNormPrior(net) as prior:
        net(x)
    assert float(prior.loss()) == __import__("pytest").approx(5.0, rel=1e-4)  # ||(3, 0, 0, 4)||


def test_the_prior_pulls_images_towards_the_statistics_and_unhooks() -> None:
    net = _net()
    x = torch.rand(8, 1, 5, 5, requires_grad=True)
    with BatchNormPrior(net) as prior:
        net(x)
    before = prior.loss()
    before.backward()
    with torch.no_grad():
        stepped = x - 0.05 * x.grad
    with BatchNormPrior(net) as after:
        net(stepped)
    assert float(after.loss()) < float(before)
    net(x)  # no hook left behind
    assert len(after._terms) == 1
    assert float(BatchNormPrior(nn.Identity()).loss()) == 0.0
