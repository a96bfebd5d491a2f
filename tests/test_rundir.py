"""Run files that survive anything: one owner per run directory, a commit point per round, one-line errors."""

from __future__ import annotations

import errno
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SMALL, together, torchrun, train_single
from fedsim import checkpoint


def _rounds(out) -> list[int]:
    return [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _event_steps(out, tag: str = "client/H1/train_loss") -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


def _histogram_steps(out, tag: str = "client/H1/layer_drift") -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"), size_guidance={"histograms": 0})
    events.Reload()
    return [e.step for e in events.Histograms(tag)]


def _temporaries(out) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob(".*.tmp*"))


#: One hospital without torchrun, 2 rounds: rank 0 is the hospital and the writer.
ONE = [*SMALL, "--rounds", "2", "--num-hospitals", "1"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("full") / "run"
    proc = train_single([*ONE, "--out", str(out)], cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


#: Points of the round's commit sequence where a run is killed (SIGKILL).
CRASHES = [
    "H1:1:before-checkpoint",
    "H1:2:training",
    "H1:2:before-checkpoint",
    "H1:2:checkpoint",
    "H1:2:after-checkpoint",
]


@pytest.fixture(scope="module")
def crashed(tmp_path_factory, cache):
    """For each crash point: (run directory, the killed launch, the same command again), two crash points at once."""

    def kill_then_rerun(crash: str):
        out = tmp_path_factory.mktemp(crash.replace(":", "-")) / "run"
        args = [*ONE, "--out", str(out), "--set", f'train.simulate_crash="{crash}"']
        killed = train_single(args, cache)
        return out, killed, (train_single(args, cache) if killed.returncode == -9 else None)

    return dict(zip(CRASHES, together(*[lambda crash=crash: kill_then_rerun(crash) for crash in CRASHES])))


@pytest.mark.parametrize("crash", CRASHES)
def test_a_crash_anywhere_in_the_round_then_a_rerun_gives_one_line_and_one_event_per_round(
    crash, crashed, uninterrupted
):
    # Prepare and execute (the fixture): the run killed (SIGKILL) at one point of the round's commit sequence,
    # then the same command again
    out, killed, rerun = crashed[crash]
    assert killed.returncode == -9, killed.stderr[-3000:]

    # Assert: every file describes the same rounds, once each; nothing half-written is left
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _rounds(out) == [0, 1]
    assert _event_steps(out) == [0, 1]
    assert _histogram_steps(out) == [0, 1]
    assert [p.name for p in checkpoint.list_rounds(out)] == ["round-0001.pt", "round-0002.pt"]
    assert _temporaries(out) == []
    final = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    reference = torch.load(uninterrupted / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(final[k], reference[k]) for k in reference)


def test_two_runs_on_one_folder_one_is_refused(cache, tmp_path):
    # Prepare: the cache is warm, so both start at once
    out = tmp_path / "run"
    args = [*ONE, "--out", str(out)]

    # Execute: two runs started together on the same --out
    import os

    env = {**os.environ, "FEDSIM_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / "train.py"), *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]

    # Assert: one ran, the other was refused at once with one line naming the folder and its owner
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], [err[-2000:] for _, err in results]
    refused = next(err for code, err in results if code == 2)
    assert (
        refused.strip()
        .splitlines()[-1]
        .startswith(f"train.py: error: run directory {out} is in use by another run (pid ")
    )
    assert _rounds(out) == [0, 1]


def test_a_lock_taken_a_moment_ago_is_refused_naming_its_owner(tmp_path):
    # Prepare: the lock is held and its owner writes its record only a little later, as a run just started does
    import fcntl
    import os
    import threading

    from fedsim.rundir import LOCK_NAME, RunDirBusy, RunLock, _write_owner

    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    writer = threading.Timer(0.3, _write_owner, args=(fd,))

    # Execute
    writer.start()
    try:
        with pytest.raises(RunDirBusy) as refused:
            RunLock(out).acquire()
    finally:
        writer.join()
        os.close(fd)

    # Assert: the refusal waited for the record and names the owner
    assert f"is in use by another run (pid {os.getpid()} on " in str(refused.value)


def test_a_held_run_directory_is_left_untouched(uninterrupted, cache, tmp_path):
    # Prepare: a finished run, and a live owner of its folder
    import shutil

    from fedsim.rundir import RunLock

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    lock = RunLock(out).acquire()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    # Execute
    try:
        second = train_single([*ONE, "--out", str(out)], cache)
    finally:
        lock.release()

    # Assert
    assert second.returncode == 2
    assert f"run directory {out} is in use by another run" in second.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_lease_file_where_the_file_system_has_no_locks(tmp_path, monkeypatch):
    # Without flock, the lock file is a lease naming a live owner; a dead owner's lease is taken over
    import fedsim.rundir as rundir

    monkeypatch.setattr(rundir, "_lock", lambda fd, blocking=True: False)
    first = rundir.RunLock(tmp_path).acquire()
    with pytest.raises(rundir.RunDirBusy, match="leased by another run .*no locks"):
        rundir.RunLock(tmp_path).acquire()
    first.release()
    assert not (tmp_path / ".lock").exists()
    (tmp_path / ".lock").write_text(json.dumps({"pid": 2**22 + 12345, "host": rundir.socket.gethostname()}))
    rundir.RunLock(tmp_path).acquire().release()


def test_full_disk_while_writing_a_checkpoint_is_one_line(cache, tmp_path, monkeypatch, capfd):
    # Prepare: the disk fills up in the middle of the first checkpoint
    import data.files
    import train

    real_write = data.files._CountingFile.write

    class Full:
        """A file on a disk that has just filled up."""

        def __init__(self, raw):
            self.raw = raw

        def write(self, blob):
            raise OSError(errno.ENOSPC, "No space left on device")

    def write(self, blob):
        if ".round-0001.pt.tmp" in str(getattr(self._handle, "name", "")) and self.written > 4096:
            self._handle = Full(self._handle)
        return real_write(self, blob)

    monkeypatch.setattr(data.files._CountingFile, "write", write)
    monkeypatch.setenv("FEDSIM_CACHE", str(cache))
    out = tmp_path / "run"

    # Execute
    code = train.main([*ONE, "--out", str(out)])

    # Assert: one line naming the file and the room it needs; no temporary file left
    err = capfd.readouterr().err
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"train.py: error: no space left on device while writing {out}/checkpoints/round-0001.pt")
    assert last.endswith("MiB needed") and "Traceback" not in err
    assert _temporaries(out) == []


def test_read_only_run_directory_is_refused_before_any_work(cache, tmp_path, monkeypatch, capfd):
    # Prepare: the run folder cannot be written (root ignores permission bits, so the file system says so)
    import fedsim.rundir
    import train

    real_open = fedsim.rundir.os.open

    def read_only(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(fedsim.rundir.os, "open", read_only)
    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path / "empty-cache"))

    # Execute
    code = train.main([*ONE, "--out", str(tmp_path / "run")])

    # Assert: refused with one line, before the synthetic data or any cache was made
    err = capfd.readouterr().err
    assert code == 2
    assert err.strip().splitlines()[-1] == f"train.py: error: read-only file system while writing {tmp_path}/run/.lock"
    assert not (tmp_path / "empty-cache").exists()


def test_an_error_is_printed_once_under_torchrun_and_ends_its_summary(cache, tmp_path):
    # Every rank parses the same bad setting; the reason is said once, and torchrun's summary carries it.
    proc = torchrun([*SMALL, "--rounds", "0", "--out", str(tmp_path / "run")], cache)
    line = "train.py: error: train.rounds = 0 must be a finite number >= 1"
    assert proc.returncode != 0
    assert proc.stderr.count(f"\n{line}") + proc.stderr.startswith(line) == 1, proc.stderr[-3000:]
    assert f"traceback : {line}" in proc.stderr
