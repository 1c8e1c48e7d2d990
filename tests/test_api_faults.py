"""Faults: an adapter whose weights can't be read (file gone, a disk error, a read that hangs) fails
its own requests with a clean 503 and never stalls the engine loop for anyone else, and loads again
once the file is back; a corrupted store file answers 503 adapter_corrupt (counted in metrics,
logged) until a re-upload of good bytes repairs it; SIGTERM with a stream longer than the drain
timeout still exits 0, having stopped accepting connections at once.

The host cache holds two of these adapters, so the ones uploaded first are on disk only by the time
they are first used: their first request reads the (sabotaged) store file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from pathlib import Path

import httpx
import pytest

from tests.api_helpers import metric, upload, wait_until, write_adapter
from tests.store_helpers import weights_file

pytestmark = pytest.mark.slow

PROMPT = "Once upon a time"
# Evicted from the host cache by the fillers uploaded after them.
COLD = ("doomed", "broken", "stuck", "rotten", "flaky")
FILLERS = ("filler-1", "filler-2")
DRAIN_TIMEOUT = 3


@pytest.fixture(scope="module")
def server(api_server_factory, tmp_path_factory):
    s = api_server_factory("--pool-bytes", "64MiB", "--max-num-seqs", "8", "--host-cache-bytes", "2MiB",
                           "--drain-timeout", str(DRAIN_TIMEOUT))
    root = tmp_path_factory.mktemp("fault_adapters")
    for i, name in enumerate(COLD + FILLERS):
        path = write_adapter(root / name, rank=8, modules=("v_proj",), seed=i)
        assert upload(s.url, name, path).status_code == 201
    s.store_dir = s.log_path.parent / "adapters"
    s.sources = root
    yield s
    s.stop()  # its memory and CPU go back to the rest of the suite


def weights(server, name: str) -> Path:
    return weights_file(server.store_dir, name)


def complete(url: str, timeout: float = 120, **fields) -> httpx.Response:
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, **fields}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=timeout)


class BaseStream(threading.Thread):
    """A base-model stream running alongside the faults; records every event."""

    def __init__(self, url: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url, self.max_tokens, self.events, self.started = url, max_tokens, [], threading.Event()

    def run(self) -> None:
        body = {"prompt": PROMPT, "max_tokens": self.max_tokens, "ignore_eos": True, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{self.url}/v1/completions", json=body, timeout=300) as r:
            for line in r.iter_lines():
                if line:
                    self.events.append(line)
                    self.started.set()

    def completed(self) -> bool:
        usage = [json.loads(e[6:])["usage"] for e in self.events[:-1] if '"usage":{' in e]
        return self.events[-1:] == ["data: [DONE]"] and usage[-1]["completion_tokens"] == self.max_tokens


def assert_unavailable(r: httpx.Response, name: str) -> None:
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert error["code"] == "adapter_unavailable" and error["param"] == "adapter_id"
    assert repr(name) in error["message"] and "/" not in error["message"]  # no server paths
    assert int(r.headers["Retry-After"]) >= 1


@pytest.mark.parametrize(("name", "sabotage"), [
    ("doomed", lambda p: p.unlink()),  # the file vanished
    ("broken", lambda p: (p.unlink(), p.mkdir())),  # a disk error: reading gives EISDIR
])
def test_unreadable_adapter_fails_only_its_requests(server, name, sabotage):
    sabotage(weights(server, name))
    stream = BaseStream(server.url, 64)
    stream.start()
    assert stream.started.wait(120)
    assert_unavailable(complete(server.url, model=name), name)
    assert_unavailable(complete(server.url, model=name, stream=True), name)  # before any event is sent
    for filler in FILLERS:
        assert complete(server.url, model=filler).status_code == 200
    stream.join(300)
    assert stream.completed(), stream.events[-3:]
    assert wait_until(lambda: metric(server.url, "lora_server_pool_pages", kind="kv") == 0)


def test_hung_adapter_read_never_stalls_the_engine(server):
    path = weights(server, "stuck")
    path.unlink()
    os.mkfifo(path)  # opening it for reading blocks until a writer comes: a hung disk
    try:
        with pytest.raises(httpx.ReadTimeout):
            complete(server.url, timeout=4, model="stuck")  # the client gives up; the request is aborted
        stream = BaseStream(server.url, 32)
        stream.start()
        for _ in range(3):  # base and resident adapters keep being served meanwhile
            assert complete(server.url).status_code == 200
            assert complete(server.url, model="filler-2").status_code == 200
        stream.join(300)
        assert stream.completed()
        assert metric(server.url, "lora_server_num_requests_running") == 0
    finally:
        # The blocked reader gets EOF: the load fails and the loader thread is free again.
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    assert_unavailable(complete(server.url, model="stuck"), "stuck")
    assert wait_until(lambda: metric(server.url, "lora_server_pool_pages", kind="kv") == 0)
    assert httpx.get(f"{server.url}/ready").status_code == 200


def test_a_failed_load_is_retried_once_the_file_is_back(server):
    path = weights(server, "flaky")
    data = path.read_bytes()
    path.unlink()
    assert_unavailable(complete(server.url, model="flaky"), "flaky")
    assert metric(server.url, "lora_server_adapter_load_failures_total", reason="missing") >= 1
    path.write_bytes(data)
    # The next request after the backoff (Retry-After: 1 s at first) loads it: no restart needed.
    assert wait_until(lambda: complete(server.url, model="flaky").status_code == 200, timeout=60,
                      interval=0.5)


def test_a_corrupted_adapter_is_refused_until_good_bytes_are_uploaded_again(server, tmp_path):
    source = server.sources / "rotten"
    # The same weights with the config written differently: another version, the same outputs.
    twin = tmp_path / "twin"
    shutil.copytree(source, twin)
    config = json.loads((twin / "adapter_config.json").read_text())
    (twin / "adapter_config.json").write_text(json.dumps(config, indent=2))
    assert upload(server.url, "rotten-twin", twin).status_code == 201
    want = complete(server.url, model="rotten-twin").json()["choices"][0]["text"]
    failures = metric(server.url, "lora_server_adapter_load_failures_total", reason="corrupt")

    path = weights(server, "rotten")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # a flipped bit inside a tensor: the file still parses
    path.write_bytes(bytes(data))
    for body in ({}, {"stream": True}):
        r = complete(server.url, model="rotten", **body)
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert error["code"] == "adapter_corrupt" and error["param"] == "adapter_id"
        assert "'rotten'" in error["message"] and "/" not in error["message"]
        assert int(r.headers["Retry-After"]) >= 1
    assert metric(server.url, "lora_server_adapter_load_failures_total", reason="corrupt") == failures + 1
    assert "loading adapter rotten failed (corrupt)" in server.log()
    for name in (*FILLERS, None):  # everything else keeps serving
        assert complete(server.url, **({"model": name} if name else {})).status_code == 200

    assert upload(server.url, "rotten", source, replace=True).status_code == 201
    r = complete(server.url, model="rotten")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == want
    assert weights(server, "rotten").read_bytes() == (source / "adapter_model.safetensors").read_bytes()


def test_sigterm_with_a_stream_longer_than_the_drain_timeout_exits_0(server):
    """Runs last: stops the server. New connections are refused at once; the long stream is cut at
    the drain timeout; the process exits 0."""
    body = {"prompt": PROMPT, "max_tokens": 600, "ignore_eos": True, "temperature": 0, "stream": True}
    events, cut = [], False
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        events.append(next(lines))
        server.proc.send_signal(signal.SIGTERM)

        def refused() -> bool:
            try:
                httpx.get(f"{server.url}/health", timeout=5)
            except httpx.ConnectError:
                return True
            return False

        assert wait_until(refused, timeout=30, interval=0.05)
        assert server.proc.poll() is None  # still draining the stream
        try:
            events += [line for line in lines if line]
        except httpx.RemoteProtocolError:
            cut = True  # the connection was closed mid-stream
    assert server.proc.wait(DRAIN_TIMEOUT + 60) == 0
    assert cut or events[-1] != "data: [DONE]"
    assert len(events) < 600
    log = server.log()  # the adapter faults above are logged with tracebacks; nothing else failed
    assert "unhandled error" not in log and "engine step failed" not in log and "stream failed" not in log
