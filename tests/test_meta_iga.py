"""iGA against its second-order expansion, and FREE without iGA as the summed-gradient step.

With plain SGD inner steps of size a, the iGA displacement is
    Delta = -a sum_i g_i + a^2 sum_{i<j} H_j g_i + O(a^3)
(g_i, H_i: gradient and Hessian of teacher i's loss at theta). An SGD outer step with
eta * s = 1 lands on theta + Delta, and the summed-gradient step with lr a lands on
theta - a sum_i g_i, so their difference minus the a^2 term must shrink like a^3.
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import Tensor, nn

from free_common.meta.config import IgaConfig, KlForm
from free_common.meta.functional import Params, batch_stat_mode, call
from free_common.meta.iga import KdBatch, iga_displacement, iga_step, summed_gradient_step
from free_common.meta.kd import distillation_loss

SCALE = 67.0


def _model() -> nn.Module:
    # Smooth activations: the expansion needs derivatives that exist everywhere.
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 4),
    ).double()


def _batches(count: int = 3) -> list[KdBatch]:
    rng = torch.Generator().manual_seed(1)
    return [
        KdBatch(
            torch.rand(6, 1, 4, 4, generator=rng, dtype=torch.float64),
            3 * torch.randn(6, 4, generator=rng, dtype=torch.float64),
        )
        for _ in range(count)
    ]


def _flat(params: dict[str, Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in params.values()])


def _alignment_term(model: nn.Module, batches: list[KdBatch], form: KlForm) -> Tensor:
    """sum_{i<j} H_j g_i at theta, by Hessian-vector products."""
    params: Params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}

    def loss(i: int) -> Tensor:
        with batch_stat_mode(model):
            logits = call(model, params, batches[i].inputs)
        return distillation_loss(logits, batches[i].teacher_logits, form)

    grads = [torch.autograd.grad(loss(i), list(params.values())) for i in range(len(batches))]
    total = torch.zeros(sum(p.numel() for p in params.values()), dtype=torch.float64)
    for j in range(len(batches)):
        g_j = torch.autograd.grad(loss(j), list(params.values()), create_graph=True)
        for i in range(j):
            dot = sum((a * b.detach()).sum() for a, b in zip(g_j, grads[i], strict=True))
            hvp = torch.autograd.grad(dot, list(params.values()), retain_graph=True)
            total += torch.cat([h.reshape(-1) for h in hvp])
    return total


def _after(model: nn.Module, step: str, a: float, batches: list[KdBatch], form: KlForm) -> Tensor:
    net = copy.deepcopy(model)
    if step == "iga":
        outer = torch.optim.SGD(net.parameters(), lr=1.0 / SCALE)  # eta * s = 1
        iga_step(net, outer, batches, IgaConfig(a, "sgd", SCALE, form))
    else:
        summed_gradient_step(net, torch.optim.SGD(net.parameters(), lr=a), batches, form)
    return _flat(dict(net.named_parameters())).detach()


def test_iga_minus_summed_step_is_the_alignment_term_up_to_a_cubed() -> None:
    for form in ("log", "prob"):
        model, batches = _model(), _batches()
        term = _alignment_term(model, batches, form)
        residuals = []
        for a in (0.1, 0.05, 0.025, 0.0125):
            difference = _after(model, "iga", a, batches, form) - _after(
                model, "sum", a, batches, form
            )
            predicted = a**2 * term
            residual = float((difference - predicted).norm())
            residuals.append(residual)
            # The a^2 term is the difference, to within the a^3 remainder.
            assert residual < 0.5 * float(predicted.norm()), (form, a)
        ratios = [r0 / r1 for r0, r1 in itertools.pairwise(residuals)]
        assert all(6.0 < r < 10.0 for r in ratios), (form, ratios)


def test_summed_gradient_step_is_one_step_on_the_sum_of_gradients() -> None:
    model, batches = _model(), _batches()
    params = dict(model.named_parameters())
    with batch_stat_mode(model):
        total = sum(
            distillation_loss(call(model, params, b.inputs), b.teacher_logits, "log")
            for b in batches
        )
    grads = torch.autograd.grad(total, list(params.values()))
    expected = _flat(params).detach() - 0.3 * torch.cat([g.reshape(-1) for g in grads])
    assert torch.allclose(_after(model, "sum", 0.3, batches, "log"), expected, atol=1e-12)


def test_iga_with_one_teacher_is_a_plain_step() -> None:
    model, batches = _model(), _batches(1)
    iga = _after(model, "iga", 0.2, batches, "log")
    assert torch.allclose(iga, _after(model, "sum", 0.2, batches, "log"), atol=1e-12)


def test_iga_pseudo_gradient_sign_and_scale() -> None:
    model, batches = _model(), _batches()
    config = IgaConfig(inner_lr=0.05, inner_optimizer="adam")
    delta, stats = iga_displacement(model, batches, config)
    net = copy.deepcopy(model)
    outer = torch.optim.SGD(net.parameters(), lr=0.001)
    iga_step(net, outer, batches, config)
    moved = _flat(dict(net.named_parameters())).detach() - _flat(dict(model.named_parameters()))
    assert torch.allclose(moved, 0.001 * config.pseudo_grad_scale * _flat(delta), atol=1e-12)
    assert len(stats.losses) == 3 and all(0.0 <= s <= 1.0 for s in stats.agreement)


def test_iga_leaves_theta_alone_until_the_outer_step_and_is_deterministic() -> None:
    model, batches = _model(), _batches()
    before = _flat(dict(model.named_parameters())).detach().clone()
    first, _ = iga_displacement(model, batches, IgaConfig())
    second, _ = iga_displacement(model, batches, IgaConfig())
    assert torch.equal(_flat(dict(model.named_parameters())).detach(), before)
    assert torch.equal(_flat(first), _flat(second))


def _grad_at(model: nn.Module, params: Params, batch: KdBatch) -> list[Tensor]:
    with batch_stat_mode(model):
        logits = call(model, params, batch.inputs)
    loss = distillation_loss(logits, batch.teacher_logits, "log")
    return list(torch.autograd.grad(loss, list(params.values())))


def test_the_presets_iga_update_matches_adam_written_out_in_float64() -> None:
    """Adam inner steps (lr 1e-3, as the presets) on each teacher in turn, then ONE step of
    the main Adam on 67 * (theta - theta~): each written out from Adam's formulas."""
    model, batches = _model(), _batches()
    # The conv bias has no true gradient under batch norm: its float noise, divided by
    # Adam's tiny second moment, is not a reference to compare with.
    model[0] = nn.Conv2d(1, 3, 3, padding=1, bias=False).double()
    lr, outer_lr, b1, b2, eps = 1e-3, 1e-3, 0.9, 0.999, 1e-8
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    fast = {n: t.clone().requires_grad_() for n, t in theta.items()}
    m = {n: torch.zeros_like(t) for n, t in theta.items()}
    v = {n: torch.zeros_like(t) for n, t in theta.items()}
    for t, batch in enumerate(batches, start=1):
        grads = _grad_at(model, fast, batch)
        with torch.no_grad():
            for (name, p), g in zip(fast.items(), grads, strict=True):
                m[name] = b1 * m[name] + (1 - b1) * g
                v[name] = b2 * v[name] + (1 - b2) * g * g
                m_hat, v_hat = m[name] / (1 - b1**t), v[name] / (1 - b2**t)
                p -= lr * m_hat / (v_hat.sqrt() + eps)
    expected = {}
    for name, start in theta.items():
        pseudo = SCALE * (start - fast[name].detach())  # the gradient the main Adam sees
        expected[name] = start - outer_lr * pseudo / (pseudo.abs() + eps)  # Adam's first step

    net = copy.deepcopy(model)
    outer = torch.optim.Adam(net.parameters(), lr=outer_lr)
    iga_step(net, outer, batches, IgaConfig(lr, "adam", SCALE, "log"))
    for name, param in net.named_parameters():
        torch.testing.assert_close(param.detach(), expected[name], rtol=1e-10, atol=1e-12)


def test_inner_rates_follow_the_outer_groups_lr_scale() -> None:
    """With SGD inner steps and one teacher, Delta = -a * s * g: s from the outer group."""
    model, batches = _model(), _batches(1)
    plain, _ = iga_displacement(model, batches, IgaConfig(1e-2, "sgd", SCALE, "log"))
    scaled, _ = iga_displacement(
        model, batches, IgaConfig(1e-2, "sgd", SCALE, "log"), {"0.weight": 0.25}
    )
    torch.testing.assert_close(scaled["0.weight"], 0.25 * plain["0.weight"])
    torch.testing.assert_close(scaled["4.weight"], plain["4.weight"])
    # iga_step reads the scale from the main optimizer's groups.
    conv, rest = [model[0].weight], [p for n, p in model.named_parameters() if n != "0.weight"]
    outer = torch.optim.SGD([{"params": conv, "lr_scale": 0.25}, {"params": rest}], lr=1.0 / SCALE)
    before = model[0].weight.detach().clone()
    iga_step(model, outer, batches, IgaConfig(1e-2, "sgd", SCALE, "log"))
    torch.testing.assert_close(model[0].weight.detach() - before, scaled["0.weight"])


def _mean_pairwise_cosine(gradients: list[list[Tensor]]) -> float:
    flat = [torch.cat([g.reshape(-1) for g in grads]) for grads in gradients]
    pairs = list(itertools.combinations(flat, 2))
    return sum(float(torch.cosine_similarity(a, b, dim=0)) for a, b in pairs) / len(pairs)


def test_alignment_is_the_mean_cosine_of_the_teachers_gradients() -> None:
    batches = _batches()
    # Without iGA every gradient is taken at theta.
    model = _model()
    theta: Params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    at_theta = [_grad_at(model, theta, b) for b in batches]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = summed_gradient_step(model, optimizer, batches, "log")
    assert stats.alignment is not None
    assert abs(stats.alignment - _mean_pairwise_cosine(at_theta)) < 1e-9
    # With iGA each one where its inner step began: SGD inner steps written out.
    model, config = _model(), IgaConfig(inner_optimizer="sgd", inner_lr=0.1)
    fast: Params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    along = []
    for batch in batches:
        grads = _grad_at(model, fast, batch)
        along.append(grads)
        stepped = zip(fast.items(), grads, strict=True)
        fast = {n: (p - 0.1 * g).detach().requires_grad_() for (n, p), g in stepped}
    _, stats = iga_displacement(model, batches, config)
    assert stats.alignment is not None
    assert abs(stats.alignment - _mean_pairwise_cosine(along)) < 1e-9
    assert iga_displacement(model, batches[:1], config)[1].alignment is None
