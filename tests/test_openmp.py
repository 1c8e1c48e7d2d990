"""server/openmp.py: one OpenMP team per process. Counted in OS threads, in a fresh process each
(the teams are per process and outlive the threads' ops)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from server import openmp

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json, os, threading, time
    import torch
    from server import openmp

    def tasks():
        return len(os.listdir("/proc/self/task"))

    def settle(n):  # a released worker leaves the task list a moment after the call returns
        deadline = time.monotonic() + 5
        while tasks() != n and time.monotonic() < deadline:
            time.sleep(0.01)
        return tasks()

    x = torch.randn(1024, 1024)
    out = {"base": tasks()}
    x.add(1)  # the main thread's team: one worker
    out["main_team"] = tasks()

    def helper():
        openmp.single_threaded()
        y = x.add(1).exp()
        torch.mm(x, x)  # MKL's GEMM opens a team of its own unless told per thread
        torch.nn.functional.linear(x[:64], x)
        out["helper_threads"] = torch.get_num_threads()
        out["during_helper"] = tasks()
        out["helper_ok"] = bool(torch.equal(y, x.add(1).exp()))

    t = threading.Thread(target=helper)
    t.start()
    t.join()
    out["after_helper"] = settle(out["main_team"])
    out["released"] = openmp.release_team()
    out["after_release"] = settle(out["base"])

    def engine():
        x.add(1)
        out["engine_threads"] = torch.get_num_threads()
        out["during_engine"] = tasks()

    t = threading.Thread(target=engine)
    t.start()
    t.join()
    print(json.dumps(out))
""")


def _run() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                          timeout=120, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(openmp._libgomp() is None, reason="torch runs on another OpenMP runtime here")
def test_one_team_per_process() -> None:
    out = _run()
    assert out["main_team"] == out["base"] + 1  # the main thread's team: itself and one worker
    # a single-threaded helper runs torch's parallel ops and MKL GEMMs inline: only itself is added
    assert out["helper_threads"] == 1
    assert out["during_helper"] == out["main_team"] + 1
    assert out["helper_ok"]
    assert out["after_helper"] == out["main_team"]
    # the main thread frees its worker; the engine thread then opens the only team, of 2
    assert out["released"] is True
    assert out["after_release"] == out["base"]
    assert out["engine_threads"] == 2
    assert out["during_engine"] == out["base"] + 2


def test_without_a_runtime_both_are_no_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openmp, "_libgomp", lambda: None)
    assert openmp.release_team() is False
    openmp.single_threaded()  # nothing to do, nothing raised
