"""Hospitals are not ranks: several per process, sampled per round, with state that survives resume."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SMALL, ranks, together, torchrun, train_single
from fedsim.engine import participants


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoint.pt", weights_only=True)["model"]


def test_one_rank_with_three_hospitals_ends_where_three_ranks_do(cache, tmp_path):
    # Execute: the same federation of 3 hospitals, on 3 ranks and on 1. The aggregates differ only in the order
    # of a float32 sum of three models (gloo's ring vs one accumulator): a few ulps. Local SGD carries such a
    # difference into the next round unamplified; Adam would not (it divides by sqrt(v), so a rounding
    # difference in a near-zero gradient becomes a step of order lr), hence sgd here.
    args = [*SMALL, "--rounds", "2", "--num-hospitals", "3", "--set", 'train.local_optimizer="sgd"', "--lr", "0.01"]
    three = ranks([*args, "--out", str(tmp_path / "three")], cache, nproc=3)
    one = train_single([*args, "--out", str(tmp_path / "one")], cache)

    # Assert: the same figures and weights, up to the order of the float32 sum of the three models
    assert three.returncode == 0, three.stderr[-3000:]
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = _weights(tmp_path / "three"), _weights(tmp_path / "one")
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)
        else:
            assert torch.equal(a[key], b[key]), key
    for ra, rb in zip(_records(tmp_path / "three"), _records(tmp_path / "one")):
        assert [c["status"] for c in ra["clients"]] == [c["status"] for c in rb["clients"]] == ["trained"] * 3
        assert [c["num_samples"] for c in ra["clients"]] == [c["num_samples"] for c in rb["clients"]]


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, cache):
    """2 ranks x 6 hospitals, 4 per round, 3 rounds, uninterrupted."""
    out = tmp_path_factory.mktemp("sampled") / "run"
    proc = ranks([*SAMPLED, "--out", str(out)], cache, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


SAMPLED = [
    *SMALL,
    "--rounds",
    "3",
    "--num-hospitals",
    "6",
    "--set",
    "train.clients_per_round=4",
    "--set",
    "data.synthetic.patients_per_grade=3",
]


def test_sampled_participants_are_the_seeds_and_records_are_complete(sampled):
    names = [f"H{k}" for k in range(1, 7)]
    for record in _records(sampled):
        chosen = participants(0, record["round"], 6, 4)
        assert [c["hospital"] for c in record["clients"]] == names
        for index, client in enumerate(record["clients"]):
            assert client["status"] == ("trained" if index in chosen else "not sampled")
            assert client["rank"] == index % 2  # hospital i on rank i mod W
        trained = [c for c in record["clients"] if c["status"] == "trained"]
        assert record["global"]["samples_aggregated"] == sum(c["num_samples"] for c in trained)
        assert len({tuple(c["weights_checksum"]) for c in record["clients"]}) == 1  # ranks agree
        seconds = record["seconds"]
        parts = ("local_training", "validation", "aggregation", "diagnostics", "checkpoint", "other")
        assert abs(sum(seconds[p] for p in parts) - seconds["total"]) <= 1e-6 * seconds["total"] + 1e-9


def test_sampled_run_killed_and_restarted_ends_bit_identical(sampled, cache, tmp_path):
    # Prepare: H2 (rank 1) is killed in the middle of round 2; torchrun restarts the group
    out = tmp_path / "run"
    proc = torchrun(
        [*SAMPLED, "--out", str(out), "--set", 'train.simulate_crash="H2:2"'],
        cache,
        nproc=2,
        extra=["--max-restarts=2"],
    )

    # Assert: it resumed after round 1 and ends with the uninterrupted run's weights and participants
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming after round 1" in proc.stderr
    assert [r["round"] for r in _records(out)] == [0, 1, 2]
    a, b = _weights(out), _weights(sampled)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [[c["status"] for c in r["clients"]] for r in _records(out)] == [
        [c["status"] for c in r["clients"]] for r in _records(sampled)
    ]


STATEFUL = [
    *SMALL,
    "--num-hospitals",
    "2",
    "--set",
    'train.bn="local"',
    "--set",
    'train.client_optimizer="persistent"',
    "--set",
    'train.server_optimizer="adam"',
    "--set",
    "train.server_lr=0.01",
]


def test_persistent_optimizers_fedbn_and_the_server_state_survive_resume(cache, tmp_path):
    # Execute: 3 rounds at once, and 1 round then 2 more
    whole, first = together(
        lambda: train_single([*STATEFUL, "--rounds", "3", "--out", str(tmp_path / "whole")], cache),
        lambda: train_single([*STATEFUL, "--rounds", "1", "--out", str(tmp_path / "parts")], cache),
    )
    rest = train_single([*STATEFUL, "--rounds", "3", "--out", str(tmp_path / "parts")], cache)

    # Assert: bit-identical global weights and per-hospital state
    for proc in (whole, first, rest):
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming after round 1" in rest.stderr
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "parts")
    assert all(torch.equal(a[k], b[k]) for k in a)
    saved = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)["engine"]["server_optimizer"]
    assert saved["name"] == "adam" and saved["m"].abs().sum() > 0
    for hospital in ("H1", "H2"):
        x = torch.load(tmp_path / "whole" / "clients" / hospital / "round-0003.pt", weights_only=True)["state"]
        y = torch.load(tmp_path / "parts" / "clients" / hospital / "round-0003.pt", weights_only=True)["state"]
        assert torch.equal(x["local"], y["local"])
        assert x["optimizer"]["state"].keys() == y["optimizer"]["state"].keys()
        assert all(
            torch.equal(x["optimizer"]["state"][i]["exp_avg"], y["optimizer"]["state"][i]["exp_avg"])
            for i in x["optimizer"]["state"]
        )
    # The two hospitals' own BatchNorm tensors differ: each kept its own.
    h1 = torch.load(tmp_path / "whole" / "clients" / "H1" / "round-0003.pt", weights_only=True)["state"]["local"]
    h2 = torch.load(tmp_path / "whole" / "clients" / "H2" / "round-0003.pt", weights_only=True)["state"]["local"]
    assert not torch.equal(h1, h2)
    assert (tmp_path / "whole" / "initial.pt").is_file()


def test_scaffold_run_carries_its_control_variate(cache, tmp_path):
    out = tmp_path / "run"
    proc = train_single(
        [*SMALL, "--rounds", "2", "--num-hospitals", "2", "--set", 'train.algorithm="scaffold"', "--out", str(out)],
        cache,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["engine"]["control"].abs().sum() > 0
    assert (
        torch.load(out / "clients" / "H1" / "round-0002.pt", weights_only=True)["state"]["control"].shape
        == state["engine"]["control"].shape
    )


def test_readme_python_api_example_runs_as_written(tmp_path):
    # The README's example, verbatim, as a script
    readme = (REPO / "README.md").read_text()
    code = re.search(r"## Python API.*?```python\n(.*?)```", readme, re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3 and all("trained" in line and "not sampled" in line for line in lines)
    # On two ranks (the round's participants dealt to them in turn) rank 0 prints the same participants; the other
    # rank's copy of the same lines is silenced, since two processes writing one pipe interleave within lines.
    ranked = tmp_path / "example_rank0.py"
    ranked.write_text(
        'import os, sys\nif os.environ.get("RANK", "0") != "0":\n    sys.stdout = open(os.devnull, "w")\n' + code
    )
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ranked)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    statuses = lambda text: [re.sub(r" loss [0-9.]+", "", line) for line in text.strip().splitlines()]  # noqa: E731
    assert statuses(two.stdout) == statuses(proc.stdout)
