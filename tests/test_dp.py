"""Differential privacy: accounting, per-sample clipping on the flat buffer, noise, Poisson sampling, DP-FedAvg.

Statistical bounds are 5 standard errors of the estimate (a false alarm about
once in 1.7 million runs for a normal estimate); draws are seeded, so a run
either always passes or always fails. Float tolerances are first-order
rounding bounds of the computation under test, derived below.
"""

from __future__ import annotations

import copy
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

pytest.importorskip("opacus")  # the optional dependency of fedsim.privacy (accountants, per-layer rules)

from fedsim import privacy as dp
from fedsim.flat import flatten
from fedsim.privacy.grad_sample import conv2d_grad_sample
from fedsim.prox import add_proximal_grad_
from models import DualStreamNet

Z = 5.0  # standard errors allowed to every statistical check


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from more threads, and OpenMP threads waiting for each other on a loaded
    machine made this file 5-40x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- accounting ---------------------------------------------------------------------------


@pytest.mark.parametrize("accountant", dp.ACCOUNTANTS)
def test_epsilon_is_the_opacus_accountant(accountant):
    from opacus.accountants import create_accountant

    sigma, q, steps, delta = 1.1, 0.02, 300, 1e-5
    reference = create_accountant(accountant)
    for _ in range(steps):  # the accountant as DPOptimizer drives it: one step() per optimizer step
        reference.step(noise_multiplier=sigma, sample_rate=q)
    assert dp.epsilon(sigma, q, steps, delta, accountant) == pytest.approx(reference.get_epsilon(delta), rel=1e-12)
    assert dp.epsilon(sigma, q, 0, delta, accountant) == 0.0
    assert dp.epsilon(0.0, q, steps, delta, accountant) == math.inf


def _exact_gaussian_epsilon(sigma: float, steps: int, delta: float) -> float:
    """The tight epsilon of `steps` Gaussian mechanisms (q = 1, sensitivity 1): a Gaussian with mu = sqrt(T)/sigma.

    delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) (Balle & Wang 2018), solved by bisection.
    """
    mu = math.sqrt(steps) / sigma
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731
    delta_of = lambda e: phi(-e / mu + mu / 2) - math.exp(e) * phi(-e / mu - mu / 2)  # noqa: E731
    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


def test_epsilon_brackets_the_exact_gaussian_mechanism():
    """At q = 1 the tight epsilon is known in closed form: both accountants bound it from above, PRV tightly.

    Catches swapped arguments (sigma for q) and a wrong delta, which a comparison with Opacus alone would not.
    """
    sigma, steps, delta = 2.0, 10, 1e-5
    exact = _exact_gaussian_epsilon(sigma, steps, delta)
    rdp, prv = dp.epsilon(sigma, 1.0, steps, delta, "rdp"), dp.epsilon(sigma, 1.0, steps, delta, "prv")
    # The classical RDP conversion at the best integer order is looser than Opacus's (Balle et al. 2020).
    classical = min(steps * a / (2 * sigma**2) + math.log(1 / delta) / (a - 1) for a in range(2, 256))
    assert exact <= rdp <= classical
    # PRV returns an upper bound within its eps_error (0.01) of the true value, plus discretization slack.
    assert exact <= prv <= exact + 0.05


@pytest.mark.parametrize("accountant,steps", [("rdp", 1200), ("prv", 50)])
def test_noise_for_epsilon_round_trips(accountant, steps):
    q, delta, target = 0.05, 1e-5, 4.0
    sigma = dp.noise_for_epsilon(target, q, steps, delta, accountant, tolerance=0.01)
    spent = dp.epsilon(sigma, q, steps, delta, accountant)
    assert target - 0.01 <= spent <= target
    assert dp.epsilon(sigma * 0.98, q, steps, delta, accountant) > spent  # less noise spends more
    with pytest.raises(ValueError):
        dp.noise_for_epsilon(-1.0, q, steps, delta, accountant)


def test_ledger_charges_only_rounds_trained_and_round_trips():
    sigma, q, steps, delta = 1.0, 0.05, 20, 1e-5
    always, sometimes = dp.PrivacyLedger(delta), dp.PrivacyLedger(delta)
    for r in range(5):
        always.record(sigma, q, steps, round_index=r)
        sometimes.record(sigma, q, steps if r % 2 == 0 else 0, round_index=r)  # sat rounds 1 and 3 out
    assert sometimes.rounds == [0, 2, 4] and sometimes.steps == 3 * steps
    assert sometimes.epsilon() == dp.epsilon(sigma, q, 3 * steps, delta)
    assert always.epsilon() == dp.epsilon(sigma, q, 5 * steps, delta) > sometimes.epsilon()
    # A straggler charged for part of a round, with another noise: one accountant call over the history.
    sometimes.record(1.5, q, 7, round_index=5)
    assert sometimes.history() == [(sigma, q, 3 * steps), (1.5, q, 7)]
    assert sometimes.epsilon() == dp.epsilon_of_history([(sigma, q, 3 * steps), (1.5, q, 7)], delta)
    before = sometimes.epsilon()
    assert (
        sometimes.epsilon_if(sigma, q, steps)
        == dp.epsilon_of_history([(sigma, q, 3 * steps), (1.5, q, 7), (sigma, q, steps)], delta)
        > before
    )
    assert sometimes.epsilon() == before  # asking did not charge

    state = sometimes.state_dict()
    from_json = dp.PrivacyLedger.from_state_dict(json.loads(json.dumps(state)))
    buffer = io.BytesIO()
    torch.save({"dp": state}, buffer)
    buffer.seek(0)
    from_checkpoint = dp.PrivacyLedger.from_state_dict(torch.load(buffer, weights_only=True)["dp"])
    for restored in (from_json, from_checkpoint):
        assert restored.state_dict() == state
        assert restored.epsilon() == before
    with pytest.raises(ValueError):
        dp.PrivacyLedger(delta, accountant="gdp")


def test_client_level_accounting_is_the_same_accountant_over_rounds():
    assert dp.client_epsilon(1.2, 10, 100, 50, 1e-3) == dp.epsilon(1.2, 0.1, 50, 1e-3)
    with pytest.raises(ValueError):
        dp.client_sample_rate(4, 3)


def test_the_package_re_exports_its_modules_and_accounting_loads_neither_torch_nor_opacus():
    # fedsim.privacy is the one import of the privacy code; its names are the objects the modules define.
    from fedsim.privacy import accounting, dpfedavg, dpsgd, modes

    modules = (modes, accounting, dpsgd, dpfedavg)
    assert sorted(dp.__all__) == sorted(n for m in modules for n in m.__all__)
    for module in modules:
        for name in module.__all__:
            assert getattr(dp, name) is getattr(module, name)
    # A fresh interpreter (this one has torch loaded): the package, a ledger or an epsilon needs neither.
    root = Path(__file__).resolve().parent.parent
    for module in ("fedsim.privacy", "fedsim.privacy.accounting"):
        code = f"import sys, {module}; print(sorted(m for m in ('torch', 'opacus') if m in sys.modules))"
        out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "[]", module


# ---- models ---------------------------------------------------------------------------------


def group_norm_dual(backbone: str = "test_resnet", hidden: int = 16, dropout: float = 0.0) -> DualStreamNet:
    """The dual-stream net with GroupNorm backbones built by timm."""
    return DualStreamNet(backbone, "dual", 3, hidden, dropout, norm="group")


def test_group_norm_backbones_have_no_batchnorm():
    with torch.device("meta"):
        big = dp.dp_backbone("resnetrs50")
    norms = [m for m in big.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.num_groups == 32 for m in norms)  # every width of ResNet-RS is a multiple of 32
    dp.check_private_model(big)
    tiny = dp.dp_backbone("test_resnet")  # widths 16, 48, ...: gcd(C, 32) groups
    assert all(m.num_channels % m.num_groups == 0 for m in tiny.modules() if isinstance(m, nn.GroupNorm))
    with pytest.raises(ValueError, match="BatchNorm"):
        dp.check_private_model(DualStreamNet("test_resnet", "dual", 3, 16))


def _reduction_bound(model: nn.Module, inputs) -> tuple[int, int]:
    """(K, L): the longest dot product any layer evaluates (forward, input or per-sample weight gradient) and
    the number of parameterized layers, for one sample."""
    longest, layers, handles = 1, 0, []

    def measure(module, args, out):
        nonlocal longest, layers
        layers += 1
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            longest = max(
                longest,
                module.in_channels // module.groups * kh * kw,  # forward
                module.out_channels * kh * kw,
                out.shape[-2] * out.shape[-1],
            )  # input, weight gradients
        elif isinstance(module, nn.Linear):
            longest = max(longest, module.in_features, module.out_features)
        elif isinstance(module, nn.GroupNorm):
            longest = max(
                longest,
                module.num_channels // module.num_groups * out.shape[-2] * out.shape[-1],
                out.shape[-2] * out.shape[-1],
            )
        else:
            raise AssertionError(f"no bound for {type(module).__name__}")

    for module in model.modules():
        if any(True for _ in module.parameters(recurse=False)):
            handles.append(module.register_forward_hook(measure))
    with torch.no_grad():
        model(*inputs)
    for h in handles:
        h.remove()
    return longest, layers


def _tiny_case(dtype: torch.dtype):
    """A GroupNorm dual test_resnet in ``dtype``, a batch of 5 pairs, each pair's gradient by ordinary autograd,
    and the tolerance of comparing two such gradient computations."""
    torch.manual_seed(0)
    model = group_norm_dual().to(dtype)
    with torch.no_grad():  # timm zero-initializes the last norm of each block, which zeroes most gradients
        for module in model.modules():
            if isinstance(module, nn.GroupNorm):
                module.weight.normal_(1.0, 0.3)
                module.bias.normal_(0.0, 0.3)
    flat = flatten(model)
    model.train()
    gen = torch.Generator().manual_seed(1)
    context = torch.randn(5, 3, 32, 32, generator=gen, dtype=dtype)
    detail = torch.randn(5, 3, 24, 24, generator=gen, dtype=dtype)
    labels = torch.randint(0, 3, (5,), generator=gen)
    reference = []
    for i in range(5):
        flat.zero_grad()
        F.cross_entropy(model(context[i : i + 1], detail[i : i + 1]), labels[i : i + 1]).backward()
        reference.append(flat.param_grads.clone())
    flat.zero_grad()
    longest, layers = _reduction_bound(model, (context[:1], detail[:1]))
    # First-order rounding bound: each layer's dot products of length <= K carry a relative error <= K*u
    # (u = unit roundoff); errors of L layers add up. Two such computations then differ by <= 2*L*K*u.
    tol = 2 * layers * longest * torch.finfo(dtype).eps / 2
    return model, flat, (context, detail), labels, torch.stack(reference), tol


@pytest.fixture(scope="module")
def tiny_case():
    return _tiny_case(torch.float32)


@pytest.fixture(scope="module")
def tiny_case64():
    return _tiny_case(torch.float64)


def _assert_close_per_tensor(flat, got: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """Every parameter tensor's gradient within ``tol`` of the expected one, relative to its norm.

    Layer by layer: a bug confined to one small layer (a norm layer's bias, say) stays visible.
    """
    for name, start, end in flat.layer_slices():
        want = expected[start:end]
        assert want.norm() > 0, name
        assert float((got[start:end] - want).norm()) <= tol * float(want.norm()), name


@pytest.mark.parametrize("method", dp.METHODS)
def test_per_sample_gradients_are_clipped_and_summed(tiny_case, method):
    model, flat, inputs, labels, reference, tol = tiny_case
    assert tol < 0.05  # the bound is meaningful: a wrong sample, scale or in-place gradient errs by O(1)
    norms = reference.norm(dim=1)
    clip = float(norms.median())  # some samples clipped, some not
    engine = dp.DPSGD(model, flat, clip, 0.0, 1.0, dp.noise_generator("cpu", 0), method=method)
    try:
        for i in range(5):  # one sample at a time: flat.grad holds that sample's clipped gradient
            flat.zero_grad()
            engine.backward(tuple(x[i : i + 1] for x in inputs), labels[i : i + 1])
            got = flat.param_grads
            assert float(engine.last_norms[0]) == pytest.approx(float(norms[i]), rel=tol)
            assert float(got.norm()) <= clip * (1 + tol)
            _assert_close_per_tensor(flat, got, reference[i] * min(1.0, clip / float(norms[i])), tol)
        flat.zero_grad()
        loss = engine.backward(inputs, labels)  # the whole batch: the noiseless sum of the clipped gradients
        factors = (clip / norms).clamp(max=1.0)
        _assert_close_per_tensor(flat, flat.param_grads, (reference * factors[:, None]).sum(0), tol)
        with torch.no_grad():
            want = float(F.cross_entropy(model(*inputs), labels, reduction="sum"))
            assert float(loss) == pytest.approx(want, rel=tol)
        flat.zero_grad()
        engine.backward(tuple(x[:0] for x in inputs), labels[:0])  # an empty batch adds nothing
        assert not flat.param_grads.any()
    finally:
        engine.close()
        flat.zero_grad()


@pytest.mark.parametrize("method", dp.METHODS)
def test_per_sample_gradients_in_float64(tiny_case64, method):
    """The same in float64, where the bound is ~1e-11: catches small systematic errors (a scale of 1.001)."""
    model, flat, inputs, labels, reference, tol = tiny_case64
    norms = reference.norm(dim=1)
    clip = float(norms.median())
    engine = dp.DPSGD(model, flat, clip, 0.0, 1.0, dp.noise_generator("cpu", 0), method=method)
    try:
        engine.backward(inputs, labels)
        assert torch.allclose(engine.last_norms, norms, rtol=tol, atol=0)
        factors = (clip / (norms + 1e-6)).clamp(max=1.0)  # the 1e-6 of Opacus's (and DPSGD's) clip factor
        _assert_close_per_tensor(flat, flat.param_grads, (reference * factors[:, None]).sum(0), tol)
    finally:
        engine.close()
        flat.zero_grad()


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # vmap of channels-last pooling
@pytest.mark.parametrize("method", dp.METHODS)
def test_per_sample_gradients_with_channels_last_tensors(tiny_case, method):
    """Channels-last weights (CUDA training) and inputs (fedsim's flips leave batches channels-last, also on CPU).

    Opacus's unfold2d reads channels-last activations as if they were contiguous: wrong conv gradients, no error.
    """
    model, flat, inputs, labels, reference, tol = tiny_case
    last = copy.deepcopy(model)
    last_flat = flatten(last, channels_last=True)
    inputs = tuple(x.contiguous(memory_format=torch.channels_last) for x in inputs)
    norms = reference.norm(dim=1)
    clip = float(norms.median())
    engine = dp.DPSGD(last, last_flat, clip, 0.0, 1.0, dp.noise_generator("cpu", 0), method=method)
    try:
        last_flat.zero_grad()
        engine.backward(inputs, labels)
        expected = (reference * (clip / norms).clamp(max=1.0)[:, None]).sum(0)
        where = {name: (start, end) for name, start, end in flat.layer_slices()}
        for name, param in last.named_parameters():
            start, end = where[name]
            want = expected[start:end].view(param.shape)
            assert float((param.grad - want).norm()) <= tol * float(want.norm()), name
    finally:
        engine.close()


@pytest.mark.parametrize(
    "groups,stride,dilation,padding,bias,side",
    [(1, 1, 1, 1, False, 6), (2, 2, 1, 1, True, 7), (1, 1, 2, (2, 0), True, 6), (4, 1, 1, 1, False, 1)],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_rule_matches_autograd(groups, stride, dilation, padding, bias, side, channels_last):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, stride=stride, dilation=dilation, padding=padding, groups=groups, bias=bias).double()
    x = torch.randn(3, 8, side, side, dtype=torch.float64)
    out = conv(x)
    grad_out = torch.randn_like(out)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    got = conv2d_grad_sample(conv, [x], grad_out)
    for i in range(3):
        want = torch.autograd.grad(conv(x[i : i + 1]), list(conv.parameters()), grad_out[i : i + 1])
        for param, expected in zip(conv.parameters(), want):
            # float64 dot products of length <= C_in * 9 * H * W: relative error <= K * u.
            bound = 8 * 9 * side * side * torch.finfo(torch.float64).eps
            assert torch.allclose(got[param][i], expected, rtol=bound, atol=bound * float(expected.abs().max()))


def test_without_clipping_or_noise_the_dp_gradient_is_the_ordinary_one_and_steps_on_the_flat_buffer(tiny_case):
    model, flat, inputs, labels, reference, tol = tiny_case
    engine = dp.DPSGD(model, flat, 1e9, 0.0, expected_batch_size=5, generator=dp.noise_generator("cpu", 0))
    flat.zero_grad()
    engine.backward(inputs, labels)
    engine.privatize_()
    _assert_close_per_tensor(flat, flat.param_grads, reference.mean(0), tol)
    # The existing step runs on it unchanged: FedProx gradient, Adam, zero_grad; the views stay bound.
    before = flat.params.detach().clone()
    anchor = before + 0.01
    add_proximal_grad_(flat.global_param_grads, flat.global_params, anchor, 0.01)
    torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True).step()
    flat.zero_grad()
    assert flat.is_intact() and not torch.equal(flat.params, before)


def test_dpsgd_refuses_models_it_cannot_privatize():
    gen = dp.noise_generator("cpu", 0)
    batchnorm = DualStreamNet("test_resnet", "dual", 3, 16)
    with pytest.raises(ValueError, match="BatchNorm"):
        dp.DPSGD(batchnorm, flatten(batchnorm), 1.0, 1.0, 8, gen)
    plain = nn.Linear(4, 2)
    other = nn.Linear(4, 2)
    with pytest.raises(ValueError, match="flat"):
        dp.DPSGD(plain, flatten(other), 1.0, 1.0, 8, gen)
    with pytest.raises(ValueError, match="method"):
        dp.DPSGD(other, flatten(other), 1.0, 1.0, 8, gen, method="ghost")


# ---- noise ----------------------------------------------------------------------------------


def _check_std(values: torch.Tensor, std: float) -> None:
    """Mean 0 and standard deviation ``std`` within Z standard errors; and 2% within the bound.

    The relative standard error of a sample std is 1/sqrt(2n); n >= 31,250 makes 2% at least 5 of them.
    """
    n = values.numel()
    assert Z / math.sqrt(2 * n) <= 0.02, "too few draws for a 2% check"
    values = values.double()
    assert abs(float(values.mean())) <= Z * std / math.sqrt(n)
    assert float(values.std()) == pytest.approx(std, rel=min(0.02, Z / math.sqrt(2 * n)))


def test_dp_sgd_noise_has_std_sigma_c():
    model = nn.Linear(200, 200)  # 40,200 coordinates a draw
    flat = flatten(model)
    sigma, clip, expected = 1.3, 0.7, 8.0
    engine = dp.DPSGD(model, flat, clip, sigma, expected, dp.noise_generator("cpu", 3), method="functorch")
    draws = []
    for _ in range(5):  # empty batches: the step adds noise only
        flat.zero_grad()
        engine.privatize_()
        draws.append(flat.param_grads * expected)
    draws = torch.stack(draws)
    _check_std(draws, sigma * clip)
    # Steps draw independently: successive draws uncorrelated (Z standard errors of a correlation, 1/sqrt(P)).
    corr = float(torch.corrcoef(draws[:2])[0, 1])
    assert abs(corr) <= Z / math.sqrt(draws.shape[1])
    again = dp.DPSGD(model, flat, clip, sigma, expected, dp.noise_generator("cpu", 3))
    flat.zero_grad()
    again.privatize_()
    assert torch.equal(flat.param_grads * expected, draws[0])  # the generator alone decides the noise
    assert engine.steps == 5


def test_noise_shares_sum_to_std_sigma_s():
    sigma, bound, ranks, n = 1.1, 0.5, 3, 200_000
    shares = []
    for rank in range(ranks):
        share = torch.zeros(n)
        dp.add_noise_share_(share, sigma, bound, ranks, dp.noise_generator("cpu", 100 + rank))
        _check_std(share, sigma * bound / math.sqrt(ranks))
        shares.append(share)
    _check_std(torch.stack(shares).sum(0), sigma * bound)


def test_clip_update_bounds_the_norm_and_keeps_the_direction():
    gen = torch.Generator().manual_seed(0)
    update = torch.randn(10_000, generator=gen)
    original = update.clone()
    norm = dp.clip_update_(update, 2.0)
    assert norm == pytest.approx(float(original.norm()), rel=1e-6)
    # float32 norm of n terms: relative error <= n*u.
    assert float(update.norm()) <= 2.0 * (1 + update.numel() * torch.finfo(torch.float32).eps / 2)
    assert float(F.cosine_similarity(update, original, dim=0)) == pytest.approx(1.0, abs=1e-6)
    small = torch.full((100,), 0.01)
    before = small.clone()
    dp.clip_update_(small, 2.0)
    assert torch.equal(small, before)  # within the bound: untouched


# ---- Poisson sampling ---------------------------------------------------------------------------


def test_poisson_batches_have_binomial_sizes_and_are_independent():
    n, q = 1000, 0.05
    sampler = dp.PoissonBatchSampler(n, q, torch.Generator().manual_seed(0), steps=2000)
    batches = list(sampler)
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    steps = len(batches)
    mean, var = n * q, n * q * (1 - q)
    assert abs(float(sizes.mean()) - mean) <= Z * math.sqrt(var / steps)
    # The sample variance of T near-normal draws has relative standard error sqrt(2/(T-1)).
    assert abs(float(sizes.var()) / var - 1) <= Z * math.sqrt(2 / (steps - 1))
    # Independence across steps: consecutive batches share Binomial(n, q^2) indices, not more (a reused mask)
    # nor fewer (batches dealt without replacement, as a shuffled epoch would).
    overlaps = torch.tensor([len(set(a) & set(b)) for a, b in zip(batches, batches[1:])], dtype=torch.float64)
    assert abs(float(overlaps.mean()) - n * q * q) <= Z * math.sqrt(n * q * q * (1 - q * q) / len(overlaps))
    # Independence across indices: each index is in Binomial(T, q) batches.
    counts = torch.bincount(torch.tensor([i for b in batches for i in b]), minlength=n).double()
    assert abs(float(counts.var()) / (steps * q * (1 - q)) - 1) <= Z * math.sqrt(2 / (n - 1))
    assert all(b == sorted(set(b)) for b in batches)


def test_poisson_sampler_follows_its_generator_and_its_indices():
    indices = list(range(0, 200, 2))
    first = list(dp.PoissonBatchSampler(indices, 0.1, torch.Generator().manual_seed(7)))
    assert len(first) == 10 == dp.steps_per_epoch(0.1)
    assert first == list(dp.PoissonBatchSampler(indices, 0.1, torch.Generator().manual_seed(7)))
    assert first != list(dp.PoissonBatchSampler(indices, 0.1, torch.Generator().manual_seed(8)))
    assert set().union(*map(set, first)) <= set(indices)
    sampler = dp.PoissonBatchSampler(indices, 0.1, torch.Generator().manual_seed(7))
    assert list(sampler) == first and list(sampler) != first  # a second epoch continues the generator


def test_empty_poisson_batches_reach_the_dp_step_as_empty_tensors(tmp_path):
    from data.cache import CachedPairs, collate_batch

    count = 6
    rng = np.random.default_rng(0)
    np.save(tmp_path / "context.npy", rng.integers(0, 256, (count, 16, 16, 3), dtype=np.uint8))
    np.save(tmp_path / "detail.npy", rng.integers(0, 256, (count, 8, 8, 3), dtype=np.uint8))
    meta = [
        {"image": i, "path": f"img{i}", "label": i % 3, "magnification": "20x", "patient": f"p{i}", "hospital": "H1"}
        for i in range(count)
    ]
    (tmp_path / "patches.json").write_text(json.dumps({"count": count, "patches": meta}))
    dataset = CachedPairs([tmp_path])
    # P(empty) = 0.9^6 = 0.53 a step: 30 steps all non-empty has probability 1e-10.
    loader = DataLoader(
        dataset,
        batch_sampler=dp.PoissonBatchSampler(count, 0.1, torch.Generator().manual_seed(0), steps=30),
        collate_fn=collate_batch,
    )
    batches = list(loader)
    empty = [b for b in batches if b[2].shape[0] == 0]
    assert empty and len(batches) == 30
    context, detail, labels, _ = empty[0]
    assert context.shape == (0, 3, 16, 16) and detail.shape == (0, 3, 8, 8)
    model = nn.Linear(3, 2)
    flat = flatten(model)
    engine = dp.DPSGD(model, flat, 1.0, 1.0, 0.6, dp.noise_generator("cpu", 0))
    assert float(engine.backward((context.float().mean((2, 3)),), labels)) == 0.0
    engine.privatize_()
    assert flat.param_grads.abs().min() > 0  # noise only
