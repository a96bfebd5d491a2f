"""The FedProx term: value, gradient mu*(w - w_global), and mu = 0."""

from __future__ import annotations

import torch
from torch import nn

from fedsim import add_proximal_grad_, flatten, proximal_term, proximal_value


def _pair():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    global_params = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model, global_params


def test_term_value_is_half_mu_squared_norm():
    # Prepare
    model, global_params = _pair()
    mu = 0.01
    sq = sum(float(((p.detach() - g) ** 2).sum()) for p, g in zip(model.parameters(), global_params))

    # Execute
    value = float(proximal_term(model.parameters(), global_params, mu).detach())

    # Assert: (mu/2)·||w - w_g||² — squared, not the plain norm. Both sides share the four per-tensor float32
    # sums; the term adds them in float32 (3 roundings of non-negative values) and scales by float32(mu/2) (2 more):
    # five roundings of at most 2^-24 relative each
    assert abs(value - 0.5 * mu * sq) <= 6 * 2**-24 * value
    assert abs(value - 0.5 * mu * sq**0.5) > 1e-6


def test_term_gradient_is_mu_times_difference():
    # Prepare
    model, global_params = _pair()
    mu = 0.1

    # Execute
    proximal_term(model.parameters(), global_params, mu).backward()

    # Assert
    for p, g in zip(model.parameters(), global_params):
        torch.testing.assert_close(p.grad, mu * (p.detach() - g))


def test_fused_flat_gradient_matches_autograd():
    # Prepare: same loss with the term in autograd vs the fused flat update
    model, global_params = _pair()
    flat = flatten(model)
    anchor = torch.cat([g.flatten() for g in global_params])
    x = torch.randn(8, 5)
    mu = 0.05
    (model(x).pow(2).mean() + proximal_term(model.parameters(), global_params, mu)).backward()
    expected = flat.param_grads.clone()
    flat.zero_grad()

    # Execute
    model(x).pow(2).mean().backward()
    add_proximal_grad_(flat.param_grads, flat.params, anchor, mu)

    # Assert: g + mu*w - mu*w_g in place (a fused multiply-add on some CPUs) against autograd's g + mu*(w - w_g): a few
    # roundings of values below 1, ~1e-7, under the default atol 1e-5; the two values sum the same squares in
    # another order, ~34 * 2^-24 relative at most
    torch.testing.assert_close(flat.param_grads, expected)
    torch.testing.assert_close(
        torch.tensor(proximal_value(flat.params, anchor, mu)),
        proximal_term(model.parameters(), global_params, mu).detach(),
    )


def test_mu_zero_leaves_the_loss_and_gradients_untouched():
    # Prepare
    model, global_params = _pair()
    flat = flatten(model)
    anchor = torch.cat([g.flatten() for g in global_params])
    model(torch.ones(1, 5)).sum().backward()
    before = flat.param_grads.clone()

    # Execute
    term = proximal_term(model.parameters(), global_params, 0.0)
    add_proximal_grad_(flat.param_grads, flat.params, anchor, 0.0)

    # Assert
    assert float(term) == 0.0 and not term.requires_grad
    assert proximal_value(flat.params, anchor, 0.0) == 0.0
    torch.testing.assert_close(flat.param_grads, before)


def test_fedbn_local_batchnorm_parameters_take_no_proximal_pull():
    # Under FedBN the BatchNorm weights are each client's own: ||w - w_global||² runs over the rest only
    from fedsim.client import StepSettings, _optimizer_step, local_proximal

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    flat = flatten(model, local_bn=True)
    anchor = flat.global_params.detach().clone()
    with torch.no_grad():
        flat.params.add_(torch.randn_like(flat.params))
    moved = flat.params.detach().clone()
    shared = [model[0].weight, model[0].bias, model[2].weight, model[2].bias]
    global_before = [p.detach().clone() for p in shared]
    settings = StepSettings(torch.device("cpu"), None, False, mu=0.5, mixup_alpha=0.0, augment=False, grad_accum=1)

    # Execute: one SGD step (lr 1) with only the proximal gradient
    _optimizer_step(flat, torch.optim.SGD(model.parameters(), lr=1.0), anchor, settings, None)

    # Assert: BatchNorm affine parameters untouched, the others pulled by mu * (w - w_global)
    torch.testing.assert_close(model[1].weight.detach(), moved[:4])
    torch.testing.assert_close(model[1].bias.detach(), moved[4:8])
    global_after = flat.global_params.detach()
    torch.testing.assert_close(global_after, torch.cat([p.flatten() for p in global_before]) * 0.5 + anchor * 0.5)
    assert local_proximal(flat, anchor, 0.5) == proximal_value(flat.global_params, anchor, 0.5)
    # The drift figures run over the same parameters: the two Linear layers' weights and biases
    assert len(flat.layer_slices(global_only=True)) == 4
