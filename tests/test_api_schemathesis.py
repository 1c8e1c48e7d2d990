"""Schemathesis over /openapi.json for a bounded time: valid and invalid requests generated from
the schema of every route. None may get a 5xx; afterwards the server is healthy and the adapter
store is still empty (every generated upload was rejected, and left no staging files).
``--max-model-len`` keeps each generated completion short, so the time goes to many requests
rather than a few long ones.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.store_helpers import stored_files as snapshot

pytestmark = pytest.mark.slow

BUDGET_SECONDS = 60



def test_schemathesis_finds_no_server_error(api_server_factory, tmp_path):
    server = api_server_factory("--pool-bytes", "64MiB", "--max-num-seqs", "16", "--max-model-len", "64",
                                "--max-upload-bytes", "4MiB", "--request-read-timeout", "30")
    try:
        check_with_schemathesis(server, tmp_path)
    finally:
        server.stop()


def check_with_schemathesis(server, tmp_path: Path) -> None:
    store = server.log_path.parent / "adapters"
    cli = Path(sys.executable).parent / "schemathesis"
    run = subprocess.run(
        [str(cli), "run", f"{server.url}/openapi.json", "--checks", "not_a_server_error",
         "--max-time", str(BUDGET_SECONDS), "--workers", "1", "--seed", "12", "--request-timeout", "120",
         "--phases", "examples,coverage,fuzzing", "--no-color"],
        capture_output=True, text=True, timeout=BUDGET_SECONDS + 600, cwd=tmp_path)
    (tmp_path / "schemathesis.log").write_text(run.stdout + run.stderr)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert httpx.get(f"{server.url}/ready").status_code == 200
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    # Every generated upload was refused and left nothing behind, not even a staging directory.
    assert snapshot(store) == {} and httpx.get(f"{server.url}/v1/adapters").json()["data"] == []
    assert "unhandled error" not in server.log()
