"""Running the plan: each unfinished train.py run under torchrun, one after another.

A run's output is appended to its own ``log.txt``; a failed run is reported
with the last lines of that log and the study goes on with the next one.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from fedsim.study.plan import Plan, Run
from fedsim.study.results import fmt, read_final

log = logging.getLogger(__name__)

TAIL_LINES = 20


def launch(run: Run) -> int:
    """Run train.py under torchrun, its output appended to the run's log.txt; returns the exit code."""
    run.folder.mkdir(parents=True, exist_ok=True)
    cmd = run.command()
    # Append: an earlier, interrupted attempt keeps its log above this one.
    with open(run.folder / "log.txt", "a") as fh:
        fh.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False)
    return proc.returncode


def log_tail(folder: Path, lines: int = TAIL_LINES) -> str:
    """The last lines of a run's log.txt."""
    path = folder / "log.txt"
    if not path.is_file():
        return "(no log.txt)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_all(plan: Plan, launcher: Callable[[Run], int] | None = None) -> dict[str, int]:
    """Run every unfinished run in turn; returns {folder name: exit code} of the failed ones."""
    launcher = launcher or launch
    todo = [run for run in plan.runs if not run.done]
    log.info("%d runs, %d already done, %d to run", len(plan.runs), len(plan.runs) - len(todo), len(todo))
    failed: dict[str, int] = {}
    for i, run in enumerate(todo, 1):
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
            continue
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
    return failed
