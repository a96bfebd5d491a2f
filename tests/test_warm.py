"""The tests' launcher (tests/warm.py) behaves as ``python SCRIPT`` and as torchrun's group do."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import warm

SCRIPT = """
import json, os, sys
import torch
print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "main": __name__, "threads": torch.get_num_threads(),
                  "rank": os.environ.get("RANK"), "world": os.environ.get("WORLD_SIZE"),
                  "marker": os.environ.get("WARM_TEST_MARKER")}))
print("to stderr", file=sys.stderr)
sys.exit(int(sys.argv[1]))
"""


def _write(tmp_path, text: str):
    script = tmp_path / "script.py"
    script.write_text(text)
    return str(script)


def test_one_process_is_the_script_as_main_with_its_argv_environment_and_exit_code(tmp_path):
    env = {**os.environ, "WARM_TEST_MARKER": "x", "OMP_NUM_THREADS": "1"}
    proc = warm.launch(_write(tmp_path, SCRIPT), ["3", "--flag"], env, cwd=str(tmp_path), timeout=60)

    seen = json.loads(proc.stdout)
    assert proc.returncode == 3
    assert seen == {
        "argv": ["3", "--flag"],
        "cwd": str(tmp_path),
        "main": "__main__",
        "threads": 1,
        "rank": None,
        "world": None,
        "marker": "x",
    }
    assert proc.stderr == "to stderr\n"


def test_a_group_gets_rank_variables_and_exit_code_zero(tmp_path):
    env = {**os.environ, "MASTER_PORT": "1", "OMP_NUM_THREADS": "1"}
    proc = warm.launch(_write(tmp_path, SCRIPT), ["0"], env, world=3, cwd=str(tmp_path), timeout=60)

    assert proc.returncode == 0
    seen = [json.loads(line) for line in proc.stdout.splitlines()]
    assert sorted(s["rank"] for s in seen) == ["0", "1", "2"]
    assert {s["world"] for s in seen} == {"3"}


def test_a_failed_rank_ends_the_others_and_the_group_exits_1(tmp_path):
    # Rank 1 fails at once; rank 0 would sleep far past the timeout unless the launcher ends it.
    script = _write(
        tmp_path,
        "import os, sys, time\nif os.environ['RANK'] == '1':\n    sys.exit(5)\ntime.sleep(600)\n",
    )
    env = {**os.environ, "MASTER_PORT": "1"}
    proc = warm.launch(script, [], env, world=2, cwd=str(tmp_path), timeout=60)

    assert proc.returncode == 1


def test_a_run_past_its_timeout_is_ended_and_raises(tmp_path):
    script = _write(tmp_path, "import time\ntime.sleep(600)\n")

    with pytest.raises(subprocess.TimeoutExpired):
        warm.launch(script, [], dict(os.environ), cwd=str(tmp_path), timeout=1)
