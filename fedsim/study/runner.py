"""Running the plan: each unfinished train.py run (under torchrun on several ranks), ``jobs`` at a time.

A run's output is appended to its own ``log.txt``; a failed run is reported
with the last lines of that log and the study goes on with the next one. With
several jobs, each run gets an equal share of the cores as its thread count
(``OMP_NUM_THREADS``, unless set), and the embedded benchmark of every seed is
rendered before any run starts, so no two runs render the same data.
"""

from __future__ import annotations

import functools
import logging
import os
import shlex
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fedsim.study.plan import Plan, Run
from fedsim.study.results import fmt, read_final

log = logging.getLogger(__name__)

TAIL_LINES = 20


def launch(run: Run, threads: int | None = None) -> int:
    """Run train.py (under torchrun on several ranks), its output appended to the run's log.txt; returns the exit code.
    ``threads``: the run's OMP_NUM_THREADS when the environment sets none."""
    run.folder.mkdir(parents=True, exist_ok=True)
    cmd = run.command()
    env = dict(os.environ)
    if threads is not None:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    # Append: an earlier, interrupted attempt keeps its log above this one.
    with open(run.folder / "log.txt", "a") as fh:
        fh.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False, env=env)
    return proc.returncode


def render_benchmarks(runs: list[Run]) -> None:
    """Render the embedded benchmark of every seed the runs need (once each), before they start."""
    from fedsim.study.plan import _train_cli

    done: set[Path] = set()
    for run in runs:
        cfg = _train_cli().parse_args(list(run.args))
        if cfg.data.path or cfg.data.source != "benchmark":
            continue
        from fedsim.sources import benchmark_root, benchmark_spec, render_benchmark

        spec = benchmark_spec(cfg)
        root = benchmark_root(cfg, spec)
        if root not in done:
            started = time.monotonic()
            render_benchmark(spec, root)
            log.info(
                "benchmark %s seed %d ready in %s (%.0f s)", spec.preset, spec.seed, root, time.monotonic() - started
            )
            done.add(root)


def log_tail(folder: Path, lines: int = TAIL_LINES) -> str:
    """The last lines of a run's log.txt."""
    path = folder / "log.txt"
    if not path.is_file():
        return "(no log.txt)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_all(plan: Plan, launcher: Callable[[Run], int] | None = None, jobs: int = 1) -> dict[str, int]:
    """Run every unfinished run, ``jobs`` at a time; returns {folder name: exit code} of the failed ones."""
    todo = [run for run in plan.runs if not run.done]
    log.info("%d runs, %d already done, %d to run", len(plan.runs), len(plan.runs) - len(todo), len(todo))
    if launcher is None:
        render_benchmarks(todo)
        threads = max(1, (os.cpu_count() or 1) // jobs)
        launcher = functools.partial(launch, threads=threads) if jobs > 1 else launch
    failed: dict[str, int] = {}
    lock = threading.Lock()

    def one(i: int, run: Run) -> None:
        names = ", ".join(sorted({name for name, _ in run.jobs}))
        log.info(
            "[%d/%d] %s (%s) on %d rank(s); log in %s",
            i,
            len(todo),
            run.folder.name,
            names,
            run.nproc,
            run.folder / "log.txt",
        )
        started = time.monotonic()
        code = launcher(run)
        seconds = time.monotonic() - started
        if code == 0 and run.done:
            accuracy = read_final(run.folder).get("accuracy")
            log.info(
                "[%d/%d] %s (%s) done in %.0f s, accuracy %s",
                i,
                len(todo),
                run.folder.name,
                names,
                seconds,
                fmt(accuracy),
            )
            return
        with lock:
            failed[run.folder.name] = code
        log.error(
            "[%d/%d] %s (%s) failed with exit code %d after %.0f s%s; last lines of its log:\n%s",
            i,
            len(todo),
            run.folder.name,
            names,
            code,
            seconds,
            "" if code else " without final.json",
            log_tail(run.folder),
        )

    if jobs <= 1:
        for i, run in enumerate(todo, 1):
            one(i, run)
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(one, range(1, len(todo) + 1), todo))
    return failed
