"""fedavg against a hand-computed numpy weighted mean, with real gloo ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import run_ranks
from fedsim import fedavg, flatten


def _tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def _client_model(rank: int) -> nn.Module:
    """Each rank a different model, BatchNorm statistics included."""
    torch.manual_seed(100 + rank)
    model = _tiny_net()
    bn = model[1]
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.num_batches_tracked.fill_(10 * (rank + 1))
    return model


def _state_np(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().astype(np.float64) for k, v in model.state_dict().items()}


def _aggregate_on_rank(rank: int, world: int, counts: list[int], bn: str, poison_dropped: bool = False):
    model = _client_model(rank)
    if poison_dropped and counts[rank] == 0:  # a diverged client: NaN weights and statistics, weight 0
        with torch.no_grad():
            for tensor in model.state_dict().values():
                if tensor.is_floating_point():
                    tensor.fill_(float("nan"))
    total = fedavg(model, counts[rank], bn=bn)
    return total, _state_np(model)


def _expected(counts: list[int]) -> dict[str, np.ndarray]:
    states = [_state_np(_client_model(r)) for r, c in enumerate(counts) if c]
    weights = np.array([c for c in counts if c], dtype=np.float64)
    return {k: sum(w * s[k] for w, s in zip(weights, states)) / weights.sum() for k in states[0]}


def _assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    # fedavg in float32: n_k * w_k, a sum of <= 3 terms in whatever order the all-reduce takes, a divide. Error
    # <= 2^-24 * (sum_k n_k |w_k| / sum_k n_k + 2 |mean|): within these bounds for |w| < 1.6, and for the running
    # variances (< 2, their mean > 0.5)
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-7)


def test_fedavg_equals_weighted_mean_with_a_dropped_rank():
    # Prepare: unequal sample counts, rank 2 dropped out (0 samples) with NaN everywhere
    counts = [120, 30, 0]

    # Execute
    results = run_ranks(_aggregate_on_rank, 3, counts, "average", True)

    # Assert: every rank holds the weighted mean of ranks 0 and 1, BatchNorm buffers included
    expected = _expected(counts)
    for total, state in results:
        assert total == 150
        for key, value in expected.items():
            if key.endswith("num_batches_tracked"):
                assert state[key] == round((120 * 10 + 30 * 20) / 150)  # 12, identical everywhere
            else:
                _assert_close(state[key], value)


def test_fedavg_all_dropped_leaves_models_unchanged():
    # Prepare
    counts = [0, 0]

    # Execute
    results = run_ranks(_aggregate_on_rank, 2, counts, "average")

    # Assert: nothing to average, each rank keeps its own weights
    for rank, (total, state) in enumerate(results):
        assert total == 0
        own = _state_np(_client_model(rank))
        for key in own:
            np.testing.assert_array_equal(state[key], own[key])


def test_fedbn_keeps_batchnorm_local():
    # Prepare
    counts = [1, 3]

    # Execute
    results = run_ranks(_aggregate_on_rank, 2, counts, "local")

    # Assert: conv/linear averaged, BatchNorm weight/bias/statistics untouched
    expected = _expected(counts)
    for rank, (_, state) in enumerate(results):
        own = _state_np(_client_model(rank))
        for key in expected:
            if key.startswith("1."):
                np.testing.assert_array_equal(state[key], own[key])
            else:
                _assert_close(state[key], expected[key])


def test_flat_buffer_backs_every_tensor_and_training_keeps_views():
    # Prepare
    model = _tiny_net()
    flat = flatten(model)
    before = flat.data.data_ptr()

    # Execute: a real optimizer step through the views
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    opt.step()

    # Assert: parameters, BN buffers and grads live in the flat buffers; the step wrote into them
    assert flat.is_intact() and flat.data.data_ptr() == before
    start, end = flat.data.data_ptr(), flat.data.data_ptr() + flat.data.numel() * 4
    for tensor in list(model.parameters()) + [model[1].running_mean, model[1].running_var]:
        assert start <= tensor.data_ptr() < end
    gstart = flat.grad.data_ptr()
    for p in model.parameters():
        assert gstart <= p.grad.data_ptr() < gstart + flat.grad.numel() * 4
    assert flat.param_grads.abs().sum() > 0
    np.testing.assert_array_equal(
        flat.params[: model[0].weight.numel()].numpy(), model[0].weight.detach().flatten().numpy()
    )


def test_channels_last_views_keep_values():
    # Prepare
    torch.manual_seed(0)
    model = _tiny_net()
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    # Execute
    flatten(model, channels_last=True)

    # Assert
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, reference[key])


def test_fedavg_rejects_negative_samples():
    with pytest.raises(ValueError, match="num_samples"):
        fedavg(_tiny_net(), -1)
