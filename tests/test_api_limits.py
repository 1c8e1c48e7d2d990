"""Auth, limits and shutdown against a strict server: keys set, one running slot, one waiting slot,
a 64 KiB upload cap. The last test sends SIGTERM, so it runs last in this module.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from urllib.parse import urlparse

import httpx
import pytest
from openai import AuthenticationError, OpenAI

pytestmark = pytest.mark.slow

API_KEY, ADMIN_KEY = "sk-test-inference", "sk-test-admin"
USER = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CAP = 64 * 1024
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def strict(api_server_factory):
    return api_server_factory("--pool-bytes", "64MiB", "--api-key", API_KEY, "--admin-key", ADMIN_KEY,
                              "--max-num-seqs", "1", "--max-waiting", "1", "--max-upload-bytes", str(CAP))


def metric(url: str, line_prefix: str) -> float:
    line = next(x for x in httpx.get(f"{url}/metrics").text.splitlines() if x.startswith(line_prefix))
    return float(line.rsplit(" ", 1)[1])


def test_inference_needs_the_api_key(strict):
    r = httpx.post(f"{strict.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 401 and "missing API key" in r.json()["error"]["message"]
    wrong = OpenAI(base_url=f"{strict.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(AuthenticationError) as err:
        wrong.completions.create(model="SmolLM2-135M-Instruct", prompt=PROMPT, max_tokens=2)
    assert err.value.status_code == 401 and "invalid API key" in err.value.body["message"]
    right = OpenAI(base_url=f"{strict.url}/v1", api_key=API_KEY, max_retries=0)
    assert right.completions.create(model="SmolLM2-135M-Instruct", prompt=PROMPT, max_tokens=2).choices
    for open_path in ("/health", "/ready", "/metrics"):
        assert httpx.get(f"{strict.url}{open_path}").status_code == 200


def test_adapter_admin_needs_the_admin_key(strict):
    files = {"adapter_config.json": ("adapter_config.json", b"{}")}
    r = httpx.post(f"{strict.url}/v1/adapters", files=files, data={"adapter_id": "x"}, headers=USER)
    assert r.status_code == 403 and "admin key" in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "permission_denied"
    assert httpx.delete(f"{strict.url}/v1/adapters/x", headers=USER).status_code == 403
    assert httpx.delete(f"{strict.url}/v1/adapters/x", headers=ADMIN).status_code == 404
    assert httpx.get(f"{strict.url}/v1/adapters", headers=USER).status_code == 200


def test_upload_over_the_cap_is_413(strict):
    big = os.urandom(2 * CAP)
    files = {"adapter_config.json": ("adapter_config.json", b"{}"),
             "adapter_model.safetensors": ("adapter_model.safetensors", big)}
    r = httpx.post(f"{strict.url}/v1/adapters", files=files, data={"adapter_id": "big"}, headers=ADMIN)
    assert r.status_code == 413 and "max_upload_bytes" in r.json()["error"]["message"]
    # Without Content-Length (chunked), the cap is enforced while reading.
    boundary = "lora-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"adapter_id\"\r\n\r\nbig\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"adapter_model.safetensors\"; "
            f"filename=\"adapter_model.safetensors\"\r\n\r\n").encode() + big
    body += f"\r\n--{boundary}--\r\n".encode()
    chunks = (body[i:i + 8192] for i in range(0, len(body), 8192))
    headers = {**ADMIN, "Content-Type": f"multipart/form-data; boundary={boundary}"}
    r = httpx.post(f"{strict.url}/v1/adapters", content=chunks, headers=headers)
    assert r.status_code == 413 and "max_upload_bytes" in r.json()["error"]["message"]


def _raw_request(url: str, body: dict) -> socket.socket:
    """Send a completion request on a bare socket and return it unread (the request stays queued)."""
    u = urlparse(url)
    data = json.dumps(body).encode()
    sock = socket.create_connection((u.hostname, u.port))
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {u.netloc}\r\nAuthorization: Bearer {API_KEY}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_queue_full_is_503_with_retry_after(strict):
    body = {"prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{strict.url}/v1/completions", json=body, headers=USER, timeout=60) as running:
        assert running.status_code == 200
        lines = running.iter_lines()  # keep a reference: a dropped iterator closes the connection
        next(lines)  # the one running slot is taken
        queued = _raw_request(strict.url, body)
        try:
            deadline = time.monotonic() + 20
            while metric(strict.url, "lora_server_num_requests_waiting") < 1:
                assert time.monotonic() < deadline, "the second request never queued"
                time.sleep(0.05)
            small = {"prompt": PROMPT, "max_tokens": 2}
            r = httpx.post(f"{strict.url}/v1/completions", json=small, headers=USER)
            assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
            assert "waiting" in r.json()["error"]["message"] and r.json()["error"]["code"] == "overloaded"
        finally:
            queued.close()
    deadline = time.monotonic() + 10
    while metric(strict.url, 'lora_server_pool_pages{kind="kv"}') > 0:
        assert time.monotonic() < deadline, "disconnected requests kept their pages"
        time.sleep(0.05)


def test_sigterm_drains_in_flight_requests_then_exits(strict):
    """SIGTERM: new connections are refused at once, the in-flight stream still finishes, exit 0."""
    body = {"prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{strict.url}/v1/completions", json=body, headers=USER, timeout=60) as r:
        lines = r.iter_lines()
        first = next(lines)
        strict.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while True:  # the listening socket closes at once, while the stream goes on
            try:
                httpx.get(f"{strict.url}/health", timeout=5)
            except httpx.ConnectError:
                break
            assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
            time.sleep(0.05)
        rest = [line for line in lines if line]
    events = [first, *rest]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert strict.proc.wait(60) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{strict.url}/health")
