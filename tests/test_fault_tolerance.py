"""Resume, killed ranks, dropped/straggling/diverging clients, multi-node on loopback, bad settings."""

from __future__ import annotations

import json
import os
import subprocess
import threading

import pytest
import torch

from conftest import REPO, SMALL, evaluate, free_port, ranks, torchrun, train_single
from fedsim import checkpoint


def _rounds(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoint.pt", weights_only=True)["model"]


def _assert_sits_out(record: dict, hospital: str, status: str) -> dict:
    """The hospital has ``status`` and the round aggregated exactly the other hospitals' samples."""
    clients = {c["hospital"]: c for c in record["clients"]}
    assert clients[hospital]["status"] == status
    others = sum(c["num_samples"] for name, c in clients.items() if name != hospital)
    assert record["global"]["samples_aggregated"] == others
    return clients


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("full") / "run"
    proc = ranks([*SMALL, "--rounds", "3", "--out", str(out)], cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_resume_is_bit_identical(uninterrupted, cache, tmp_path):
    # Prepare: the same run stopped after round 1
    out = tmp_path / "run"
    first = ranks([*SMALL, "--rounds", "1", "--out", str(out)], cache)
    assert first.returncode == 0, first.stderr[-3000:]

    # Execute: continue to round 3
    second = ranks([*SMALL, "--rounds", "3", "--resume", "--out", str(out)], cache)

    # Assert
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming after round 1" in second.stderr
    assert [r["round"] for r in _rounds(out)] == [0, 1, 2]
    _assert_identical(_weights(out), _weights(uninterrupted))


def test_killed_rank_restarts_and_ends_identical(uninterrupted, cache, tmp_path):
    # Prepare: hospital H2 (rank 1) is SIGKILLed in the middle of round 2
    out = tmp_path / "run"

    # Execute: torchrun restarts the group; it resumes after round 1. A second restart is allowed because gloo's
    # rendezvous right after a kill can be refused once on a loaded machine; the crash itself happens only once.
    proc = torchrun(
        [*SMALL, "--rounds", "3", "--out", str(out), "--set", 'train.simulate_crash="H2:2"'],
        cache,
        extra=["--max-restarts=2"],
    )

    # Assert
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / ".crashed-H2-round2").exists()
    assert "resuming after round 1" in proc.stderr
    assert [r["round"] for r in _rounds(out)] == [0, 1, 2]
    # The config differs only by the crash simulation, which does not touch the arithmetic.
    _assert_identical(_weights(out), _weights(uninterrupted))


def test_corrupt_latest_checkpoint_falls_back(uninterrupted, tmp_path):
    # Prepare: a copy of the run directory whose newest checkpoint is truncated
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    newest = checkpoint.list_rounds(out)[-1]
    newest.write_bytes(newest.read_bytes()[:1000])

    # Execute
    found = checkpoint.load_latest_usable(out)

    # Assert: round 2's checkpoint (index 1) is used instead
    assert found is not None and found[1].name == "round-0002.pt" and found[0]["round"] == 1
    with pytest.raises(checkpoint.CheckpointError, match="corrupt or truncated"):
        checkpoint.load(newest)


def test_resume_refuses_another_config(uninterrupted, cache, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    before = {name: (out / name).read_bytes() for name in ("config.json", "splits.csv")}
    proc = ranks([*SMALL, "--rounds", "4", "--mu", "0.5", "--out", str(out)], cache)
    assert proc.returncode != 0
    assert "another config" in proc.stderr
    assert {name: (out / name).read_bytes() for name in before} == before  # the old run's files untouched


def test_resume_refuses_another_federation(uninterrupted, cache, tmp_path):
    # Same settings, but two ranks: hospitals H1, H2 cannot continue the federation of H1, H2, H3
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    proc = ranks([*SMALL, "--rounds", "4", "--out", str(out)], cache, nproc=2)
    assert proc.returncode != 0
    assert "federation of H1, H2, H3; this run has H1, H2" in proc.stderr


def test_fedbn_resume_falls_back_past_a_corrupt_checkpoint(cache, tmp_path):
    # Prepare: a FedBN run of 2 rounds whose newest global checkpoint is corrupt
    out = tmp_path / "run"
    fedbn = [*SMALL, "--set", 'train.bn="local"', "--out", str(out)]
    first = ranks([*fedbn, "--rounds", "2"], cache)
    assert first.returncode == 0, first.stderr[-3000:]
    newest = checkpoint.list_rounds(out)[-1]
    newest.write_bytes(newest.read_bytes()[:1000])

    # Execute
    second = ranks([*fedbn, "--rounds", "3"], cache)

    # Assert: every hospital resumed from round 1 with its own BatchNorm tensors of round 1
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming after round 1" in second.stderr
    assert [r["round"] for r in _rounds(out)] == [0, 1, 2]
    assert sorted(p.name for p in (out / "clients" / "H1").iterdir()) == [
        "round-0001.pt",
        "round-0002.pt",
        "round-0003.pt",
    ]
    # eval.py says whose BatchNorm a FedBN checkpoint carries
    evaluated = evaluate(out, tmp_path / "eval", cache, "--bootstrap", "10")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "BatchNorm tensors are hospital H1's" in evaluated.stderr
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["batchnorm_of"] == "H1"


def test_dropout_of_one_client_and_of_all(cache, tmp_path):
    # Execute: H2 always drops out; then every client drops out
    one = ranks(
        [
            *SMALL,
            "--rounds",
            "2",
            "--dropout",
            "1",
            "--set",
            'train.faulty_hospitals=["H2"]',
            "--out",
            str(tmp_path / "one"),
        ],
        cache,
    )
    # Everyone gone: the three hospitals on one process (a rank whose hospitals all drop out sends zeros, as above)
    every = train_single(
        [*SMALL, "--rounds", "2", "--num-hospitals", "3", "--dropout", "1", "--out", str(tmp_path / "all")], cache
    )

    # Assert: H2 contributes nothing, the others are averaged and stay in sync
    assert one.returncode == 0, one.stderr[-3000:]
    for record in _rounds(tmp_path / "one"):
        _assert_sits_out(record, "H2", "dropped")
        assert len({tuple(c["weights_checksum"]) for c in record["clients"]}) == 1
    # With everyone gone the global model never changes.
    assert every.returncode == 0, every.stderr[-3000:]
    records = _rounds(tmp_path / "all")
    assert all(r["global"]["samples_aggregated"] == 0 for r in records)
    assert all(c["global_update_norm"] == 0 for r in records for c in r["clients"])


def test_straggler_does_partial_work(cache, tmp_path):
    # The straggler's plan is per hospital: three hospitals on one process show it as well as three ranks
    proc = train_single(
        [
            *SMALL,
            "--rounds",
            "1",
            "--num-hospitals",
            "3",
            "--local-epochs",
            "3",
            "--straggler",
            "1",
            "--set",
            'train.faulty_hospitals=["H1"]',
            "--out",
            str(tmp_path / "run"),
        ],
        cache,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    clients = {c["hospital"]: c for c in _rounds(tmp_path / "run")[0]["clients"]}
    assert clients["H1"]["status"] == "straggler" and 1 <= clients["H1"]["epochs"] <= 2
    assert clients["H2"]["epochs"] == 3
    # Partial work is still aggregated.
    aggregated = _rounds(tmp_path / "run")[0]["global"]["samples_aggregated"]
    assert aggregated == sum(c["num_samples"] for c in clients.values())


def test_nan_client_is_excluded_and_global_stays_finite(cache, tmp_path):
    # Two local epochs: the second runs forward passes with the NaN weights, which poison BatchNorm statistics too
    proc = ranks(
        [
            *SMALL,
            "--rounds",
            "2",
            "--local-epochs",
            "2",
            "--set",
            'train.simulate_nan=["H3"]',
            "--out",
            str(tmp_path / "run"),
        ],
        cache,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for record in _rounds(tmp_path / "run"):
        _assert_sits_out(record, "H3", "diverged")
    assert all(torch.isfinite(v).all() for v in _weights(tmp_path / "run").values() if v.is_floating_point())


def test_two_launches_form_one_group_of_four(cache, tmp_path):
    # Prepare: two "nodes" on loopback, each with its own local disk (cache)
    endpoint = f"127.0.0.1:{free_port()}"
    out = tmp_path / "run"
    args = [*SMALL, "--rounds", "1", "--out", str(out)]
    results = {}

    def node(index: int) -> None:
        results[index] = torchrun(args, tmp_path / f"node{index}", nproc=2, nnodes=2, endpoint=endpoint)

    # Execute
    threads = [threading.Thread(target=node, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    # Assert
    for proc in results.values():
        assert proc.returncode == 0, proc.stderr[-3000:]
    record = _rounds(out)[0]
    assert sorted(c["hospital"] for c in record["clients"]) == ["H1", "H2", "H3", "H4"]
    assert len({tuple(c["weights_checksum"]) for c in record["clients"]}) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mu", "-1"], "train.mu = -1.0 must be a finite number >= 0"),
        (["--rounds", "0"], "train.rounds = 0 must be a finite number >= 1"),
        (["--backbone", "resnet_nope"], "is not a timm model"),
        (["--data", "/nonexistent/crc-hgd"], "data path does not exist"),
        (["--set", "train.clients_per_round=2"], "train.clients_per_round = 2 but the federation has 1 hospitals"),
        (["--mode", "sideways"], "train.mode = 'sideways' is not allowed; choose one of: federated, centralized"),
        (["--set", "train.nope=1"], "unknown setting train.nope"),
        (["--set", 'train.simulate_crash="H2"'], "must look like HOSPITAL:ROUND"),
        (["--set", "data.site_shift=5"], "data.site_shift = 5.0 must lie in [0, 4]"),
        (["--set", "train.timeout_s=inf"], "train.timeout_s = inf must be a finite number >= 1.0"),
        (["--set", "data.split=[nan, 0.5, 0.5]"], "must be three non-negative fractions summing to 1"),
        (["--set", 'data.patient_regex="(P"'], "data.patient_regex = '(P' is not a regular expression"),
        (["--set", 'data.classes=["Grade I"]'], "must name at least two classes"),
        # Settings that do not fit the data: checked once the data is read, before any image is cached
        (["--set", "data.split=[1.0, 0.0, 0.0]"], "the data has no validation and no test images"),
        (["--set", "data.split=[0.8, 0.2, 0.0]"], "the data has no test images"),
        (["--set", 'train.faulty_hospitals=["H9"]'], "train.faulty_hospitals names 'H9', which is not a hospital"),
        (["--set", 'train.simulate_nan=["h1"]'], "train.simulate_nan names 'h1', which is not a hospital"),
        (["--set", 'train.simulate_crash="H4:1"'], "train.simulate_crash names 'H4', which is not a hospital"),
    ],
)
def test_bad_settings_give_one_line_and_exit_code(args, message, cache, tmp_path, capfd, monkeypatch):
    # In-process: the same main() a rank runs, without paying for a new interpreter per case.
    import train

    monkeypatch.setenv("FEDSIM_CACHE", str(cache))
    patches = lambda: sorted(p.name for p in (cache / "patches").glob("*"))  # noqa: E731
    before = patches()
    code = train.main([*SMALL, "--out", str(tmp_path / "run"), *args])
    err = capfd.readouterr().err
    assert code == 2
    assert message in err.strip().splitlines()[-1]
    assert "Traceback" not in err
    assert patches() == before  # refused before any image was cached


def test_bad_setting_exit_code_through_the_interpreter(cache, tmp_path):
    proc = train_single([*SMALL, "--out", str(tmp_path / "run"), "--rounds", "-3"], cache)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "train.py: error: train.rounds = -3 must be a finite number >= 1"


def test_world_size_must_match_natural_partition(uninterrupted, cache, tmp_path):
    # The embedded data has 3 hospitals in its manifest; a federation of 2 cannot take it.
    manifest = next(cache.glob("synthetic-*/manifest.csv"))
    proc = ranks([*SMALL, "--rounds", "1", "--data", str(manifest), "--out", str(tmp_path / "run")], cache, nproc=2)
    assert proc.returncode != 0
    assert "3" in proc.stderr and "2" in proc.stderr and "hospital" in proc.stderr


def test_timeout_names_the_hung_hospital(cache, tmp_path):
    # H3 stops responding in round 1; the others must not wait forever
    proc = ranks(
        [
            *SMALL,
            "--rounds",
            "1",
            "--set",
            'train.simulate_hang="H3:1"',
            "--set",
            "train.timeout_s=15",
            "--out",
            str(tmp_path / "run"),
        ],
        cache,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "hospital(s) H3" in proc.stderr and "did not arrive within 15s" in proc.stderr


def _launch(tmp_path, env: dict) -> subprocess.CompletedProcess:
    """launch.sh copied away from the repository (as sbatch does), with an interpreter that prints its arguments."""
    import shutil

    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    shutil.copy(REPO / "launch.sh", spool / "slurm_script")
    echo = tmp_path / "python"
    echo.write_text('#!/bin/sh\necho "$@"\n')
    echo.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "FEDSIM_HOME"))}
    return subprocess.run(
        ["bash", str(spool / "slurm_script"), "--rounds", "1"],
        capture_output=True,
        text=True,
        env={**clean, "MODE": "local", "PYTHON": str(echo), **env},
        timeout=60,
    )


def test_launch_script_finds_train_py_when_run_as_a_copy(tmp_path):
    found = _launch(tmp_path, {"SLURM_SUBMIT_DIR": str(REPO)})
    assert found.returncode == 0, found.stderr
    assert f"{REPO}/train.py --rounds 1" in found.stdout
    assert f"{REPO}/train.py" in _launch(tmp_path, {"FEDSIM_HOME": str(REPO)}).stdout
    lost = _launch(tmp_path, {})
    assert lost.returncode == 2 and "set FEDSIM_HOME" in lost.stderr


def _crash_or_wait(rank: int, port: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import time

    import torch.distributed as dist

    from fedsim.dist import HungRanks, wait_for_all

    dist.init_process_group("gloo", rank=rank, world_size=2)
    if rank == 1:
        time.sleep(1)
        os._exit(1)  # dies without a word, as a segfault or the OOM killer would
    try:
        wait_for_all(600, "round 1 aggregation")
        outcome = "no error"
    except HungRanks as err:
        outcome = json.dumps({"message": str(err), "crashed": err.crashed, "ranks": err.ranks})
    with open(path, "w") as fh:
        fh.write(outcome)
    os._exit(0)


def test_a_crashed_rank_is_reported_as_crashed_not_as_a_timeout(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    port, path = free_port(), str(tmp_path / "outcome.json")
    procs = [ctx.Process(target=_crash_or_wait, args=(rank, port, path)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    with open(path) as fh:
        outcome = json.loads(fh.read())
    assert outcome["crashed"] and outcome["ranks"] == [1]
    assert "rank(s) [1] left the group after" in outcome["message"]
