"""DP-SGD, DP-FedAvg and secure aggregation in real federations (gloo ranks, the embedded data)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from conftest import run_ranks
from fedsim import privacy as dp
from fedsim.config import ConfigError, from_dict

CONFIG = {
    "data": {
        "synthetic": {"image_size": 256, "patients_per_grade": 3, "images_per_patient": 2},
        "context_size": 64,
        "detail_size": 48,
        "context_fov": 96,
        "patches_per_image": 2,
        "eval_patches_per_image": 2,
    },
    "model": {"backbone": "test_resnet", "hidden": 16},
    "train": {"rounds": 1, "local_epochs": 1, "batch_size": 8, "device": "cpu", "mixup_alpha": 0.0, "xai_per_grade": 0},
}
UNIT_ROUNDOFF = 2.0**-24  # float32


def _config(out: str, **train) -> dict:
    tree = json.loads(json.dumps(CONFIG))
    for key, value in train.items():
        node = tree["train"]
        *parents, leaf = key.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return {**tree, "out": out}


def _federate(rank: int, world: int, tree: dict, cache: str, spy: bool = False):
    """One federation; returns its final flat weights, what it sent (when spied) and its plaintexts."""
    os.environ["FEDSIM_CACHE"] = cache
    from fedsim.dist import init_distributed
    from fedsim.federation import Federation
    from fedsim.privacy.secagg import SecureAggregation

    sent, plain = [], []
    originals = {name: getattr(dist, name) for name in ("all_reduce", "broadcast", "all_gather_object")}
    secure_sum = SecureAggregation.secure_sum_
    if spy:

        def wrap(name):
            def call(*args, **kwargs):
                payload = args[1] if name == "all_gather_object" else args[0]
                if isinstance(payload, torch.Tensor):
                    sent.append((name, payload.detach().clone()))
                else:
                    sent.append((name, type(payload).__name__))
                return originals[name](*args, **kwargs)

            return call

        def record_plaintext(self, tensor, *args, **kwargs):
            plain.append(tensor.detach().clone())
            return secure_sum(self, tensor, *args, **kwargs)

        for name in originals:
            setattr(dist, name, wrap(name))
        SecureAggregation.secure_sum_ = record_plaintext
    try:
        federation = Federation(from_dict(tree), init_distributed("cpu", 120))
        federation.run()
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
        SecureAggregation.secure_sum_ = secure_sum
    # numpy, not tensors: a tensor crosses the result queue as shared memory of a process about to exit
    return (
        federation.flat.data.numpy().copy(),
        [(n, t if isinstance(t, str) else t.numpy()) for n, t in sent],
        [t.numpy() for t in plain],
    )


def _records(out) -> list[dict]:
    return [json.loads(line) for line in Path(out, "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


# ---- secure aggregation ---------------------------------------------------------------------------------------


def test_secure_aggregation_sends_uniform_integers_and_matches_plain_fedavg(tmp_path):
    # Prepare
    cache = str(tmp_path / "cache")
    secure_tree = _config(str(tmp_path / "secure"), secure_aggregation=True, secagg__clip=1.0)
    plain_tree = _config(str(tmp_path / "plain"))

    # Execute: the same two-hospital round, with and without masks
    secure = run_ranks(_federate, 2, secure_tree, cache, True, timeout=600)
    plain = run_ranks(_federate, 2, plain_tree, cache, False, timeout=600)

    # Assert: what crossed ranks
    from scipy.stats import chisquare

    from fedsim.privacy.secagg import max_abs_error

    for _weights, sent, plaintexts in secure:
        tensors = [(name, t) for name, t in sent if not isinstance(t, str)]
        # Small ones: the int32 wrap probe at start (192 values), the round's sum of weights and counters.
        large = [(name, t) for name, t in tensors if t.size > 1024]
        # The initial model (rank 0's broadcast), then the round's masked sum: nothing else large crosses.
        assert [name for name, _ in large] == ["broadcast", "all_reduce"]
        masked = large[1][1]
        assert masked.dtype == np.int32  # the default wire: the masked values in place, summed modulo 2^32
        values = masked.view(np.uint32)
        counts = np.bincount(values >> 24, minlength=256)
        assert chisquare(counts).pvalue > 1e-4  # uniform top bits (fresh keys: a 1-in-10^4 false alarm)
        (plaintext,) = plaintexts
        r = np.corrcoef(values.astype(np.float64), plaintext.astype(np.float64))[0, 1]
        assert abs(r) < 5 / math.sqrt(values.size)  # ~N(0, 1/n) when masked; ~1 if it were the plaintext
        # The other float tensors are the small plain sum of weights and counters.
        assert all(t.size <= 1024 for name, t in tensors if t.dtype.kind == "f" and name == "all_reduce")
    # Assert: the aggregate is plain FedAvg's to the quantization error. Each element differs by at most
    # the secure sum's bound plus float32 rounding of (update = w_k x_k - w_k g) and (g + sum): a few
    # unit roundoffs of the largest weight magnitude.
    got, want = secure[0][0], plain[0][0]
    assert np.array_equal(secure[0][0], secure[1][0])  # every rank holds the same model
    bound = max_abs_error(2, 1.0, 2**22) + 8 * UNIT_ROUNDOFF * float(np.abs(want).max())
    assert float(np.abs(got - want).max()) <= bound
    assert not np.array_equal(got, want)  # quantization did happen: the two paths are not the same code


# ---- DP-SGD ------------------------------------------------------------------------------------------------------

#: DP-SGD with noise derived from the seed, so that runs repeat bit for bit.
DP_SGD = {"dp__level": "sample", "dp__noise_multiplier": 1.1, "dp__noise_seed": "derived", "dp__delta": 1e-4}


@pytest.fixture(scope="module")
def dp_sgd_run(tmp_path_factory):
    """Two rounds of DP-SGD on two hospitals: (its config, its final weights, the data cache)."""
    folder = tmp_path_factory.mktemp("dp-sgd")
    cache = str(folder / "cache")
    whole = _config(str(folder / "whole"), rounds=2, **DP_SGD)
    return whole, run_ranks(_federate, 2, whole, cache, timeout=600), cache


def test_dp_sgd_run_charges_the_accountant_and_resumes_its_ledger(tmp_path, dp_sgd_run):
    # Prepare
    whole, whole_run, cache = dp_sgd_run
    parts = _config(str(tmp_path / "parts"), rounds=1, **DP_SGD)

    # Execute: one round, then a second run that continues it to the whole run's two
    run_ranks(_federate, 2, parts, cache, timeout=600)
    parts["train"]["rounds"] = 2
    resumed = run_ranks(_federate, 2, parts, cache, timeout=600)

    # Assert: epsilon is the accountant's for (sigma, q, steps), per hospital and round
    records = _records(whole["out"])
    for record in records:
        for c in record["clients"]:
            q = 8 / c["num_samples"]
            steps = (record["round"] + 1) * dp.steps_per_epoch(q)
            assert c["sample_rate"] == pytest.approx(q) and c["dp_steps"] == steps
            assert c["epsilon"] == pytest.approx(dp.epsilon(1.1, q, steps, 1e-4), rel=1e-9)
            assert c["accountant"] == "rdp" and c["noise_multiplier"] == 1.1
    resumed_records = _records(parts["out"])
    assert [[c["epsilon"] for c in r["clients"]] for r in resumed_records] == [
        [c["epsilon"] for c in r["clients"]] for r in records
    ]
    assert np.array_equal(whole_run[0][0], resumed[0][0])  # the ledger and the noise resume exactly
    final = json.loads(Path(whole["out"], "final.json").read_text(encoding="utf-8"))
    assert final["privacy"]["level"] == "sample"
    assert final["privacy"]["epsilon"] == {c["hospital"]: c["epsilon"] for c in records[-1]["clients"]}
    # GroupNorm backbones under DP
    state = torch.load(os.path.join(whole["out"], "checkpoint.pt"), weights_only=False)
    assert not any("running_mean" in key for key in state["model"])


def test_dp_sgd_budget_stops_a_hospital(tmp_path, dp_sgd_run):
    # Prepare: a budget just above what the first round spent, so that one round fits and two do not
    whole, _, cache = dp_sgd_run
    first = _records(whole["out"])[0]["clients"]
    budget = max(c["epsilon"] for c in first) * 1.01
    limited = _config(str(tmp_path / "limited"), rounds=2, dp__max_epsilon=budget, **DP_SGD)

    # Execute
    run_ranks(_federate, 2, limited, cache, timeout=600)

    # Assert
    records = _records(limited["out"])
    assert [c["status"] for c in records[0]["clients"]] == ["trained", "trained"]
    assert [c["status"] for c in records[1]["clients"]] == ["budget spent", "budget spent"]
    assert all(c["epsilon"] <= budget for r in records for c in r["clients"])
    assert [c["dp_steps"] for c in records[1]["clients"]] == [c["dp_steps"] for c in records[0]["clients"]]


# ---- DP-FedAvg --------------------------------------------------------------------------------------------------


def test_client_level_dp_clips_updates_weighs_equally_and_accounts_per_round(tmp_path):
    # Prepare: four hospitals on two ranks, two per round; no noise, so the clipping shows exactly
    cache = str(tmp_path / "cache")
    bound = 0.05
    tree = _config(
        str(tmp_path / "run"),
        rounds=2,
        clients_per_round=2,
        dp__level="client",
        dp__noise_multiplier=0.0,
        dp__max_update_norm=bound,
    )
    tree["data"]["num_hospitals"] = 4

    # Execute
    run_ranks(_federate, 2, tree, cache, timeout=600)

    # Assert
    for record in _records(tree["out"]):
        trained = [c for c in record["clients"] if c["status"] == "trained"]
        assert len(trained) == 2
        assert all(c["drift"] > bound for c in trained)  # the clip bites
        # The mean of two updates of norm <= S, each weighted 1/2: norm <= S (plus float32 rounding).
        assert trained[0]["global_update_norm"] <= bound * (1 + 1e-4)
        assert all(c["sample_rate"] == 0.5 for c in record["clients"])
        assert len({c["epsilon"] for c in record["clients"]}) == 1  # every hospital is charged every round


def test_client_level_budget_ends_the_run(tmp_path):
    cache = str(tmp_path / "cache")
    sigma, delta = 2.0, 1e-3
    budget = (dp.client_epsilon(sigma, 2, 2, 1, delta) + dp.client_epsilon(sigma, 2, 2, 2, delta)) / 2
    tree = _config(
        str(tmp_path / "run"),
        rounds=3,
        dp__level="client",
        dp__noise_multiplier=sigma,
        dp__delta=delta,
        dp__max_epsilon=budget,
    )

    run_ranks(_federate, 2, tree, cache, timeout=600)

    records = _records(tree["out"])
    assert [r["round"] for r in records] == [0]
    assert records[0]["clients"][0]["epsilon"] == pytest.approx(dp.client_epsilon(sigma, 2, 2, 1, delta))
    final = json.loads(Path(tree["out"], "final.json").read_text(encoding="utf-8"))
    assert final["privacy"]["level"] == "client" and final["n_images"] > 0


# ---- settings ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "train,model,message",
    [
        ({"dp": {"level": "sample"}, "mixup_alpha": 0.2}, {}, "MixUp mixes samples"),
        ({"dp": {"level": "sample"}, "mixup_alpha": 0.0}, {"norm": "batch"}, "model.norm = batch"),
        ({"dp": {"level": "sample"}, "mixup_alpha": 0.0, "bn": "local"}, {}, "train.bn = local"),
        ({"dp": {"level": "sample"}, "mixup_alpha": 0.0, "grad_accum": 2}, {}, "grad_accum"),
        ({"dp": {"level": "client"}, "mode": "centralized"}, {}, "centralized"),
        ({"dp": {"level": "client"}, "algorithm": "scaffold"}, {}, "control variates"),
        ({"secure_aggregation": True, "mode": "centralized"}, {}, "federated runs"),
        ({"secagg": {"levels": 1000}}, {}, "power of two"),
        ({"dp": {"level": "sample", "delta": 0.5}, "mixup_alpha": 0.0}, {}, "train.dp.delta"),
    ],
)
def test_settings_privacy_cannot_honour_are_refused(train, model, message):
    with pytest.raises(ConfigError, match=message):
        from_dict({"train": train, "model": model})


def test_dp_defaults_to_groupnorm_and_plain_runs_keep_batchnorm():
    assert from_dict({"train": {"dp": {"level": "sample"}, "mixup_alpha": 0.0}}).norm == "group"
    assert from_dict({"train": {"dp": {"level": "client"}}}).norm == "group"
    assert from_dict({}).norm == "batch"


def test_client_level_noise_on_the_mean_has_std_sigma_s_over_k():
    # Prepare: a group of one, a model whose update is zero, two participants per round
    from torch import nn

    from fedsim.config import DPConfig, SecAggConfig
    from fedsim.flat import flatten
    from fedsim.privacy import Privacy

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        flat = flatten(nn.Linear(400, 250))  # 100,250 coordinates
        sigma, bound, k = 1.1, 0.5, 2
        privacy = Privacy(
            DPConfig(level="client", noise_multiplier=sigma, max_update_norm=bound, noise_seed="derived"),
            False,
            SecAggConfig(),
            [10, 10],
            8,
            1,
            3,
            k,
            0,
            torch.device("cpu"),
            1,
        )
        start = flat.data.clone()
        flat.pack_scratch()
        buffer = flat.reduced
        buffer.mul_(0.5)  # one participant, weight 1/K

        # Execute
        with torch.no_grad():
            privacy.reduce_(buffer, flat, start, 0)

        # Assert: the mean moved by the noise alone; std within 5 standard errors (1/sqrt(2n) relative)
        noise = (flat.global_params - start[flat.global_slice]).double()
        n = noise.numel()
        assert float(noise.std()) == pytest.approx(sigma * bound / k, rel=5 / math.sqrt(2 * n))
        assert float(flat.scratch[0]) == 1.0  # the fixed denominator: nothing to renormalize
    finally:
        dist.destroy_process_group()
