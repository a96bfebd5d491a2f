"""The federation engine on its own: server optimizers, SCAFFOLD, participants, one all-reduce per round."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from fedsim.client import StepSettings
from fedsim.engine import Client, Engine, EngineSettings, Faults, hosted_by, participants
from fedsim.flat import flatten
from fedsim.strategies import ServerOptimizer

EPS32 = 2.0**-24
NO_FAULTS = Faults()  # frozen: safe to share as a default


@pytest.fixture()
def group_of_one():
    """A process group of one (the engine's collectives run, with nobody else)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _numpy_server(name: str, w, deltas, lr, momentum=0.9, b1=0.9, b2=0.99, tau=1e-3):
    """The update rules of Reddi et al. (2021) as the README states them, in float64."""
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    for delta in deltas:
        if name == "sgd":
            w = w + lr * delta
            continue
        if name == "avgm":
            m = momentum * m + delta
            w = w + lr * m
            continue
        m = b1 * m + (1 - b1) * delta
        if name == "adam":
            v = b2 * v + (1 - b2) * delta**2
        elif name == "yogi":
            v = v - (1 - b2) * delta**2 * np.sign(v - delta**2)
        else:
            v = v + delta**2
        w = w + lr * m / (np.sqrt(v) + tau)
    return w


@pytest.mark.parametrize(
    "name, lr", [("sgd", 1.0), ("sgd", 0.5), ("avgm", 1.0), ("adam", 0.1), ("yogi", 0.1), ("adagrad", 0.1)]
)
def test_server_optimizers_match_their_closed_form_over_two_rounds(name, lr):
    # Prepare: global weights and the aggregated means of two rounds
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=5000).astype(np.float32)
    deltas = [rng.normal(scale=0.01, size=5000).astype(np.float32) for _ in range(2)]
    server = ServerOptimizer(name, lr)
    weights = torch.from_numpy(w0.copy())

    # Execute: each round, the model holds the mean on entry (as after the all-reduce)
    for delta in deltas:
        start = weights.clone()
        weights.add_(torch.from_numpy(delta))
        server.step_(weights, weights, start)

    # Assert: float32 against float64; a few roundings of values of order |w| (+ lr * m / sqrt(v) ~ lr)
    expected = _numpy_server(name, w0.astype(np.float64), [d.astype(np.float64) for d in deltas], lr)
    np.testing.assert_allclose(weights.numpy(), expected, rtol=0, atol=64 * EPS32 * (np.abs(expected).max() + 1))
    state = server.state_dict()
    again = ServerOptimizer(name, lr)
    again.load_state_dict(state, torch.device("cpu"))
    assert all(torch.equal(state[k], again.state_dict()[k]) for k in state if k != "name")


def _regression_clients(num: int = 2, rows: int = 4):
    """Linear least squares per client: features X_k, targets y_k (one full batch per epoch)."""
    rng = np.random.default_rng(1)
    sizes = [rows * (k + 1) for k in range(num)]
    return [(rng.normal(size=(n, 3)).astype(np.float32), rng.normal(size=n).astype(np.float32)) for n in sizes]


def _mse(model, batch, settings, rng):
    x, y = batch
    return ((model(x).squeeze(1) - y) ** 2).mean(), len(y)


def _engine(data, algorithm: str, lr: float, per_round: int = 0, faults: Faults = NO_FAULTS, **more):
    model = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -0.25, 1.0]]))
    flat = flatten(model)
    clients = [
        Client(k, f"H{k + 1}", len(y), [(torch.from_numpy(x), torch.from_numpy(y))]) for k, (x, y) in enumerate(data)
    ]
    settings = EngineSettings(
        **{"local_optimizer": "sgd", **more},
        local_epochs=1,
        lr=lr,
        algorithm=algorithm,
        clients_per_round=per_round,
        faults=faults,
    )
    step = StepSettings(torch.device("cpu"), None, False, 0.0, 0.0, False, 1)
    engine = Engine(
        model, flat, clients, [c.name for c in clients], [c.num_samples for c in clients], settings, step, loss_fn=_mse
    )
    return engine, model


def _grad(w, x, y):
    """Gradient of mean((x w - y)^2) in float64."""
    return 2 * x.T @ (x @ w - y) / len(y)


def test_scaffold_control_variates_match_a_hand_computed_two_client_example(group_of_one):
    # Prepare: two clients, plain SGD with one step per round, so every quantity has a closed form
    data = _regression_clients()
    lr = 0.1
    engine, model = _engine(data, "scaffold", lr)
    x = [d[0].astype(np.float64) for d in data]
    y = [d[1].astype(np.float64) for d in data]
    n = np.array([len(v) for v in y], dtype=np.float64)
    w = np.array([0.5, -0.25, 1.0])
    c = np.zeros(3)
    ck = [np.zeros(3), np.zeros(3)]

    for _ in range(2):
        # Execute
        engine.round(0)
        # The hand computation of the same round (Karimireddy et al. 2020, option II, K = 1 step)
        local = [w - lr * (_grad(w, x[k], y[k]) + c - ck[k]) for k in range(2)]
        new_ck = [ck[k] - c + (w - local[k]) / lr for k in range(2)]
        c = c + sum(new_ck[k] - ck[k] for k in range(2)) / 2
        ck = new_ck
        w = sum(n[k] * local[k] for k in range(2)) / n.sum()

        # Assert: float32 steps on values of order 1
        tol = 64 * EPS32 * (np.abs(w).max() + 1)
        np.testing.assert_allclose(model.weight.detach().numpy().ravel(), w, rtol=0, atol=tol)
        np.testing.assert_allclose(engine.control.numpy(), c, rtol=0, atol=tol / lr)
        for k, client in enumerate(engine.clients):
            np.testing.assert_allclose(client.state["control"].numpy(), ck[k], rtol=0, atol=tol / lr)


def test_one_all_reduce_per_round_whatever_the_clients_per_rank(group_of_one, monkeypatch):
    # Prepare: three clients on one rank, the collective counted
    calls = []
    real = dist.all_reduce

    def counted(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", counted)
    engine, model = _engine(_regression_clients(3), "fedavg", 0.05)

    # Execute
    for r in range(3):
        engine.round(r)

    # Assert: one collective per round, over the weights and the sample weight
    assert calls == [engine.flat.reduced.numel()] * 3


def test_fedavg_of_several_clients_on_one_rank_is_the_weighted_mean(group_of_one):
    data = _regression_clients(3)
    lr = 0.1
    engine, model = _engine(data, "fedavg", lr)
    w = np.array([0.5, -0.25, 1.0])
    engine.round(0)
    n = np.array([len(d[1]) for d in data], dtype=np.float64)
    local = [w - lr * _grad(w, d[0].astype(np.float64), d[1].astype(np.float64)) for d in data]
    expected = sum(n[k] * local[k] for k in range(3)) / n.sum()
    np.testing.assert_allclose(model.weight.detach().numpy().ravel(), expected, rtol=0, atol=64 * EPS32 * 2)


def test_cosine_schedule_sets_each_rounds_learning_rate(group_of_one):
    # Prepare: plain SGD, one full-batch step per round, so round r moves w by lr_r times the weighted gradient
    data = _regression_clients(2)
    lr, rounds = 0.1, 3
    engine, model = _engine(data, "fedavg", lr, lr_schedule="cosine", rounds=rounds)
    n = np.array([len(d[1]) for d in data], dtype=np.float64)
    w = np.array([0.5, -0.25, 1.0])
    for r in range(rounds):
        # Execute
        engine.round(r)
        # Assert: lr_r = lr (1 + cos(pi r / R)) / 2, applied as the closed form says (float32 steps, values ~1)
        lr_r = lr * 0.5 * (1 + np.cos(np.pi * r / rounds))
        assert engine.settings.lr_at(r) == pytest.approx(lr_r, rel=1e-12)
        grad = sum(n[k] * _grad(w, d[0].astype(np.float64), d[1].astype(np.float64)) for k, d in enumerate(data))
        w = w - lr_r * grad / n.sum()
        np.testing.assert_allclose(model.weight.detach().numpy().ravel(), w, rtol=0, atol=64 * EPS32 * 2)
    assert 0 < engine.settings.lr_at(rounds - 1) < engine.settings.lr_at(0)  # decays, never to 0 within the run


def test_a_persistent_optimizer_takes_the_rounds_learning_rate(group_of_one):
    engine, _ = _engine(
        _regression_clients(2),
        "fedavg",
        0.1,
        local_optimizer="adam",
        client_optimizer="persistent",
        lr_schedule="cosine",
        rounds=4,
    )
    for r in range(3):
        engine.round(r)
        for client in engine.clients:  # the state saved after round r carries round r's rate, not the first's
            assert client.state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(engine.settings.lr_at(r))
    assert engine.settings.lr_at(2) < engine.settings.lr_at(0)


def test_participants_depend_on_seed_and_round_alone():
    first = [participants(7, r, 6, 4) for r in range(5)]
    assert first == [participants(7, r, 6, 4) for r in range(5)]
    assert all(len(p) == 4 and len(set(p)) == 4 and p == sorted(p) for p in first)
    assert len({tuple(p) for p in first}) > 1  # rounds differ
    assert participants(7, 0, 6, 0) == list(range(6)) == participants(7, 0, 6, 6)
    assert hosted_by(0, 2, 5) == [0, 2, 4] and hosted_by(1, 2, 5) == [1, 3]
    with pytest.raises(ValueError, match="cannot fill 3 ranks"):
        hosted_by(0, 3, 2)


def test_records_say_what_every_client_did(group_of_one):
    # Prepare: 4 clients, 3 per round, one of which always drops out
    engine, _ = _engine(_regression_clients(4), "fedavg", 0.05, per_round=3, faults=Faults(dropout=1.0, only=("H2",)))

    # Execute
    seen = []
    for r in range(4):
        chosen = participants(0, r, 4, 3)
        statuses = {c.name: o.figures["status"] for c, o in zip(engine.clients, engine.round(r))}
        seen.append((chosen, statuses))

    # Assert
    for chosen, statuses in seen:
        for index, name in enumerate(["H1", "H2", "H3", "H4"]):
            expected = "not sampled" if index not in chosen else "dropped" if name == "H2" else "trained"
            assert statuses[name] == expected


def test_dealing_participants_needs_clients_without_state():
    engine, _ = _engine(_regression_clients(2), "scaffold", 0.1)
    with pytest.raises(ValueError, match="clients without state"):
        engine.deal(0, 2)


@pytest.mark.parametrize("write", ["optimizer-like", "through .data", "load_state_dict"])
def test_a_model_changed_between_rounds_is_the_next_rounds_start(group_of_one, write):
    # Prepare: one client (its weight is applied in the drift pass, and the post-aggregation pass refreshes the
    # round's snapshot), plain SGD with one full-batch step, so each round has a closed form
    data = _regression_clients(1)
    lr = 0.1
    engine, model = _engine(data, "fedavg", lr)
    x, y = (v.astype(np.float64) for v in data[0])
    engine.round(0)

    # Execute: the weights are changed outside the engine, then a round runs
    new = np.array([[2.0, 1.0, -1.0]], dtype=np.float32)
    if write == "optimizer-like":
        with torch.no_grad():
            model.weight.copy_(torch.from_numpy(new))
    elif write == "through .data":  # bypasses torch's version counters: the spot check sees it
        model.weight.data.copy_(torch.from_numpy(new))
    else:
        model.load_state_dict({"weight": torch.from_numpy(new)})
    outcome = engine.round(1)[0]

    # Assert: the round started from the new weights (its drift is the step taken from them)
    w = new.ravel().astype(np.float64)
    step = lr * _grad(w, x, y)
    np.testing.assert_allclose(model.weight.detach().numpy().ravel(), w - step, rtol=0, atol=64 * EPS32 * 4)
    assert outcome.figures["drift"] == pytest.approx(np.linalg.norm(step), rel=1e-4)
