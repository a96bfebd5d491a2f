"""Processes for the tests that start with fedsim already imported.

A new interpreter spends about 5 s importing torch, timm and fedsim before a tiny run's first step, and most of
the suite's process launches are such runs. Here one fork server imports them once; each launch forks from it and
runs the script as ``python SCRIPT ARGS`` would (``runpy`` as ``__main__``, its own environment, working folder,
standard streams and exit code), ``world`` of them as the ranks of one group on loopback with the variables
torchrun gives its workers. The tests of torchrun itself (restarts, several launches in one group, its error
summary) keep starting the real torchrun.

The fork server runs no torch operation before it forks, so each child starts its thread pools itself, with the
thread count its environment asks for.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

#: What every run imports; the fork server imports these once.
PRELOAD = ["torch", "torch._dynamo", "torch.distributed", "timm", "fedsim.run", "fedsim.evaluation.offline"]

_CONTEXT = None
_START = threading.Lock()


def context():
    """The fork-server context, its server started (and its imports done) on first use."""
    global _CONTEXT
    with _START:
        if _CONTEXT is None:
            server = multiprocessing.get_context("forkserver")
            server.set_forkserver_preload(PRELOAD)
            from multiprocessing import forkserver

            forkserver.ensure_running()
            _CONTEXT = server
        return _CONTEXT


def _child(script: str, argv: list[str], env: dict, cwd: str, out: str, err: str) -> None:
    """In the forked process: become ``python SCRIPT ARGV`` with ``env``, writing to ``out`` and ``err``."""
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(target, fd)
        os.close(target)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True, write_through=True)
    if env.get("OMP_NUM_THREADS"):
        # The fork server's OpenMP has its thread count already; a new interpreter would read it from here.
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    os.chdir(cwd)
    sys.argv = [script, *argv]
    sys.path[0] = str(Path(script).parent)
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        atexit._run_exitfuncs()  # as the interpreter does at exit; multiprocessing's children skip them


def launch(
    script: str, argv: list[str], env: dict, *, world: int = 0, cwd: str, timeout: float
) -> subprocess.CompletedProcess:
    """Run ``script argv`` as one process (``world=0``: no rank variables, a group of one) or as the ``world`` ranks
    of one group. Like torchrun, a failed rank ends the others, and the group's exit code is 0 or 1.

    Raises:
        subprocess.TimeoutExpired: after ending every process still running at ``timeout``.
    """
    server = context()
    command = [sys.executable, script, *argv]
    with tempfile.TemporaryDirectory(prefix="fedsim-launch-") as folder:
        out, err = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
        envs = [{**env, **_rank_variables(rank, world, env)} for rank in range(max(world, 1))]
        procs = [server.Process(target=_child, args=(script, argv, each, cwd, out, err)) for each in envs]
        with _START:
            for proc in procs:
                proc.start()
        try:
            failed = _wait(procs, timeout)
        except subprocess.TimeoutExpired:
            _end(procs)
            raise subprocess.TimeoutExpired(command, timeout) from None
        _end(procs)
        stdout, stderr = (Path(path).read_text(errors="replace") if os.path.exists(path) else "" for path in (out, err))
    code = procs[0].exitcode if world == 0 else int(failed)
    return subprocess.CompletedProcess(command, code, stdout, stderr)


def _rank_variables(rank: int, world: int, env: dict) -> dict:
    if world == 0:
        return {}
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "GROUP_RANK": "0",
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": env["MASTER_PORT"],
    }


def _wait(procs, timeout: float) -> bool:
    """Wait until every process has ended, or one has failed; True when one failed."""
    deadline = time.monotonic() + timeout
    while True:
        codes = [proc.exitcode for proc in procs]
        if any(code not in (None, 0) for code in codes):
            return True
        if all(code == 0 for code in codes):
            return False
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired([], timeout)
        procs[codes.index(None)].join(0.05)


def _end(procs, grace: float = 5.0) -> None:
    """SIGTERM to the processes still running, SIGKILL to those left after ``grace`` seconds."""
    for proc in procs:
        if proc.exitcode is None:
            os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        proc.join(max(deadline - time.monotonic(), 0))
        if proc.exitcode is None:
            proc.kill()
            proc.join()
