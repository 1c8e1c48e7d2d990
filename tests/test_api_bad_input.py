"""The bad-input catalogue: every case is a request a real client (or attacker) might send, with the
status it must get and the field its message must name. None may be a 5xx; the server keeps
serving, and no rejected upload changes the adapter store.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest

from tests.api_helpers import BASE, FILES, upload, write_adapter
from tests.store_helpers import stored_files as snapshot

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
KNOWN = "known-adapter"
UPLOAD_CAP = 4 * 2**20
REQUEST_CAP = 2**20
READ_TIMEOUT = 4


@pytest.fixture(scope="module")
def server(api_server_factory, tmp_path_factory):
    s = api_server_factory("--pool-bytes", "64MiB", "--max-num-seqs", "4",
                           "--max-upload-bytes", str(UPLOAD_CAP), "--max-request-bytes", str(REQUEST_CAP),
                           "--request-read-timeout", str(READ_TIMEOUT))
    good = write_adapter(tmp_path_factory.mktemp("good") / "a", rank=8, modules=("v_proj",))
    assert upload(s.url, KNOWN, good).status_code == 201
    s.store_dir = s.log_path.parent / "adapters"
    s.store_before = snapshot(s.store_dir)
    s.good = good
    yield s
    s.stop()  # its memory and CPU go back to the rest of the suite



@dataclass
class Case:
    id: str
    status: int
    param: str | None
    words: tuple[str, ...] = ()
    path: str = "/v1/completions"
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


def cmpl(**fields: Any) -> dict[str, Any]:
    return {"prompt": PROMPT, "max_tokens": 2, **fields}


def chat(**fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}


CHAT = "/v1/chat/completions"
JSON = {"Content-Type": "application/json"}
REQUESTS = [
    Case("max_tokens-string", 400, "max_tokens", ("max_tokens",), json=cmpl(max_tokens="many")),
    Case("max_tokens-negative", 400, "max_tokens", ("max_tokens", "-1"), json=cmpl(max_tokens=-1)),
    Case("max_tokens-zero", 400, "max_tokens", (">= 1",), json=cmpl(max_tokens=0)),
    Case("max_tokens-huge", 400, "max_tokens", ("context length",), json=cmpl(max_tokens=10**30)),
    Case("max_tokens-5000-digits", 400, "body", ("digits",), content=b'{"prompt": "x", "max_tokens": 1'
         + b"0" * 5000 + b"}", headers=JSON),
    Case("temperature-negative", 400, "temperature", ("temperature",), json=cmpl(temperature=-1)),
    Case("temperature-string", 400, "temperature", ("temperature",), json=cmpl(temperature="hot")),
    Case("temperature-nan", 400, "temperature", ("temperature", "nan"),
         content=b'{"prompt": "x", "max_tokens": 2, "temperature": NaN}', headers=JSON),
    Case("top_p-zero", 400, "top_p", ("top_p",), json=cmpl(top_p=0)),
    Case("top_p-above-1", 400, "top_p", ("top_p",), json=cmpl(top_p=1.5)),
    Case("top_k-negative", 400, "top_k", ("top_k",), json=cmpl(top_k=-5)),
    Case("n-zero", 400, "n", ("n",), json=cmpl(n=0)),
    Case("n-too-many", 400, "n", ("n", "16"), json=cmpl(n=17)),
    Case("logprobs-21", 400, "logprobs", ("logprobs", "20"), json=cmpl(logprobs=21)),
    Case("seed-too-big", 400, "seed", ("seed",), json=cmpl(seed=2**70)),
    Case("seed-string", 400, "seed", ("seed",), json=cmpl(seed="lucky")),
    Case("stop-too-many", 400, "stop", ("stop", "16"), json=cmpl(stop=[f"s{i}" for i in range(17)])),
    Case("stop-empty-string", 400, "stop", ("stop",), json=cmpl(stop=[""])),
    Case("stop_token_ids-negative", 400, "stop_token_ids", ("stop_token_ids",),
         json=cmpl(stop_token_ids=[-1])),
    Case("min_tokens-above-max", 400, "min_tokens", ("min_tokens",), json=cmpl(min_tokens=5)),
    Case("prompt-missing", 400, "prompt", ("prompt",), json={"max_tokens": 2}),
    Case("prompt-empty-list", 400, "prompt", ("prompt", "empty"), json=cmpl(prompt=[])),
    Case("prompt-empty-ids", 400, "prompt", ("prompt", "empty"), json=cmpl(prompt=[[]])),
    Case("prompt-id-out-of-vocab", 400, "prompt", ("prompt", "token ids"), json=cmpl(prompt=[10**9])),
    Case("prompt-wrong-type", 400, "prompt", ("prompt",), json=cmpl(prompt=123)),
    Case("prompt-too-long", 400, "prompt", ("context length",), json=cmpl(prompt="word " * 9000)),
    Case("prompts-times-n", 400, "prompt", ("prompts", "split"), json=cmpl(prompt=["a"] * 20, n=16)),
    Case("echo", 400, "echo", ("echo",), json=cmpl(echo=True)),
    Case("logit_bias", 400, "logit_bias", ("logit_bias", "not supported"), json=cmpl(logit_bias={"42": 5})),
    Case("frequency_penalty", 400, "frequency_penalty", ("frequency_penalty",),
         json=cmpl(frequency_penalty=0.5)),
    Case("best_of", 400, "best_of", ("best_of",), json=cmpl(best_of=3)),
    Case("suffix", 400, "suffix", ("suffix",), json=cmpl(suffix="}")),
    Case("stream-not-boolean", 400, "stream", ("stream",), json=cmpl(stream="sometimes")),
    Case("stream_options-wrong-type", 400, "stream_options", ("stream_options",),
         json=cmpl(stream_options=3)),
    Case("adapter_id-dotdot", 400, "adapter_id", ("adapter_id", "../x"), json=cmpl(adapter_id="../x")),
    Case("adapter_id-slash", 400, "adapter_id", ("a/b",), json=cmpl(adapter_id="a/b")),
    Case("adapter_id-empty", 400, "adapter_id", ("invalid adapter_id",), json=cmpl(adapter_id="")),
    Case("adapter_id-300-chars", 400, "adapter_id", ("invalid adapter_id",), json=cmpl(adapter_id="x" * 300)),
    Case("adapter_id-unknown", 404, "adapter_id", ("no-such",), json=cmpl(adapter_id="no-such")),
    Case("model-unknown", 404, "model", ("gpt-9", "neither"), json=cmpl(model="gpt-9")),
    Case("model-hf-style", 404, "model", ("org/model",), json=cmpl(model="org/model")),
    Case("chat-no-messages", 400, "messages", ("messages",), path=CHAT, json=chat(messages=[])),
    Case("chat-bad-role", 400, "messages", ("role",), path=CHAT,
         json=chat(messages=[{"role": "wizard", "content": "x"}])),
    Case("chat-image-part", 400, "messages", ("text parts",), path=CHAT,
         json=chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
                   )),
    Case("chat-tools", 400, "tools", ("tools",), path=CHAT, json=chat(tools=[{"type": "function"}])),
    Case("chat-response_format", 400, "response_format", ("response_format",), path=CHAT,
         json=chat(response_format={"type": "json_object"})),
    Case("chat-max_completion_tokens-negative", 400, "max_completion_tokens", ("max_completion_tokens",),
         path=CHAT, json=chat(max_tokens=None, max_completion_tokens=-3)),
    Case("body-not-json", 400, "body", ("JSON",), content=b'{"prompt": ', headers=JSON),
    Case("body-invalid-utf8", 400, "body", ("UTF-8",), content=b'{"prompt": "caf\xe9"}', headers=JSON),
    Case("body-json-bomb", 400, "body", ("nests too deeply",),
         content=b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", headers=JSON),
    Case("body-is-a-list", 400, "body", ("body",), json=[1, 2]),
    Case("body-text-plain", 400, "body", ("body",), content=b'{"prompt": "x"}',
         headers={"Content-Type": "text/plain"}),
    Case("body-over-cap", 413, "body", ("max_request_bytes",), json=cmpl(prompt="x" * (REQUEST_CAP + 10))),
    Case("header-too-large", 431, "x-big", ("x-big", "8192"), json=cmpl(), headers={"X-Big": "a" * 20_000}),
    Case("headers-too-many", 431, "headers", ("headers total",), json=cmpl(),
         headers={f"X-H{i}": "a" * 1000 for i in range(40)}),
]


@pytest.mark.parametrize("case", REQUESTS, ids=lambda c: c.id)
def test_bad_request(server, case):
    kwargs: dict[str, Any] = {"headers": case.headers, "timeout": 60}
    if case.content is not None:
        kwargs["content"] = case.content
    else:
        kwargs["json"] = case.json
    r = httpx.post(f"{server.url}{case.path}", **kwargs)
    assert r.status_code == case.status, r.text
    error = r.json()["error"]
    assert error["param"] == case.param, error
    for word in case.words:
        assert word in error["message"], (word, error["message"])
    assert KNOWN not in error["message"]  # a 404 never lists other adapters


# ---- uploads ---------------------------------------------------------------------------------


def good_files(server) -> dict[str, bytes]:
    return {name: (server.good / name).read_bytes() for name in FILES}


def tamper_header(weights: bytes, edit) -> bytes:
    """Rewrite a safetensors file's JSON header with ``edit(header) -> length override or None``."""
    n = struct.unpack("<Q", weights[:8])[0]
    header = json.loads(weights[8:8 + n])
    length = edit(header)
    body = json.dumps(header).encode()
    return struct.pack("<Q", length if length is not None else len(body)) + body + weights[8 + n:]


def first_tensor(header: dict) -> dict:
    return header[sorted(k for k in header if k != "__metadata__")[0]]


def lie_shape(header: dict) -> None:
    first_tensor(header)["shape"] = [8, 999]


def lie_dtype(header: dict) -> None:
    first_tensor(header)["dtype"] = "Q4_K"


def lie_offsets(header: dict) -> None:
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    header[last]["data_offsets"][1] += 4096
    header[last]["shape"][0] += 4096 // (4 * header[last]["shape"][1])


def rank_lie(files: dict[str, bytes]) -> dict[str, bytes]:
    config = json.loads(files[FILES[0]])
    return {**files, FILES[0]: json.dumps({**config, "r": 4}).encode()}


UPLOADS = [  # (id, parts builder, status, param, words)
    ("missing-weights", lambda f: [("adapter_id", "x"), (FILES[0], f[FILES[0]])], 400, FILES[1],
     ("missing",)),
    ("missing-adapter_id", lambda f: [(FILES[0], f[FILES[0]]), (FILES[1], f[FILES[1]])], 400, "adapter_id",
     ("adapter_id",)),
    ("duplicated-config", lambda f: [("adapter_id", "x"), (FILES[0], f[FILES[0]]), (FILES[0], f[FILES[0]]),
                                     (FILES[1], f[FILES[1]])], 400, FILES[0], ("twice",)),
    ("duplicated-adapter_id", lambda f: [("adapter_id", "x"), ("adapter_id", "y"), (FILES[0], f[FILES[0]]),
                                         (FILES[1], f[FILES[1]])], 400, "adapter_id", ("twice",)),
    ("extra-file", lambda f: [("adapter_id", "x"), (FILES[0], f[FILES[0]]), (FILES[1], f[FILES[1]]),
                              ("optimizer.pt", b"\x80")], 400, "optimizer.pt", ("unexpected file",)),
    ("tokenizer-not-loadable", lambda f: [("adapter_id", "x"), *f.items(), ("tokenizer.json", b"{}")],
     422, "tokenizer.json", ("tokenizer cannot be loaded",)),
    ("extra-field", lambda f: [("adapter_id", "x"), ("tenant", "acme"), (FILES[0], f[FILES[0]]),
                               (FILES[1], f[FILES[1]])], 400, "tenant", ("unexpected form field",)),
    ("config-as-text-field", lambda f: [("adapter_id", "x"), (FILES[0], f[FILES[0]].decode()),
                                        (FILES[1], f[FILES[1]])], 400, FILES[0], ("file part",)),
    ("replace-not-boolean", lambda f: [("adapter_id", "x"), ("replace", "maybe"), (FILES[0], f[FILES[0]]),
                                       (FILES[1], f[FILES[1]])], 400, "replace", ("true or false",)),
    ("id-dotdot", lambda f: [("adapter_id", "../x"), *f.items()], 400, "adapter_id", ("../x",)),
    ("id-slash", lambda f: [("adapter_id", "a/b"), *f.items()], 400, "adapter_id", ("a/b",)),
    ("id-300-chars", lambda f: [("adapter_id", "x" * 300), *f.items()], 400, "adapter_id", ("invalid",)),
    ("id-other-tenant", lambda f: [("adapter_id", "Acme:x"), *f.items()], 400, "adapter_id", ("invalid",)),
    ("id-is-base-model", lambda f: [("adapter_id", BASE), *f.items()], 400, "adapter_id", ("base model",)),
    ("config-not-json", lambda f: [("adapter_id", "x"), (FILES[0], b"{r: 8"), (FILES[1], f[FILES[1]])],
     422, FILES[0], ("not valid JSON",)),
    ("config-claims-other-rank", lambda f: [("adapter_id", "x"), *rank_lie(f).items()], 422, "r",
     ("rank 4", "[8, 576]")),
    ("safetensors-header-length-lies", lambda f: [("adapter_id", "x"), (FILES[0], f[FILES[0]]),
                                                  (FILES[1], tamper_header(f[FILES[1]], lambda h: 10**12))],
     422, FILES[1], ("header length",)),
    ("safetensors-shape-lies", lambda f: [("adapter_id", "x"), (FILES[0], f[FILES[0]]),
                                          (FILES[1], tamper_header(f[FILES[1]], lie_shape))],
     422, FILES[1], ("data_offsets", "999")),
    ("safetensors-dtype-lies", lambda f: [("adapter_id", "x"), (FILES[0], f[FILES[0]]),
                                          (FILES[1], tamper_header(f[FILES[1]], lie_dtype))],
     422, FILES[1], ("unknown dtype", "Q4_K")),
    ("safetensors-offsets-past-the-end", lambda f: [("adapter_id", "x"), (FILES[0], f[FILES[0]]),
                                                    (FILES[1], tamper_header(f[FILES[1]], lie_offsets))],
     422, FILES[1], ("truncated",)),
]


def multipart(parts: list[tuple[str, Any]]) -> tuple[bytes, str]:
    boundary = "catalogue-boundary"
    out = b""
    for name, value in parts:
        if isinstance(value, bytes):
            disposition = f'form-data; name="{name}"; filename="{name}"'
        else:
            disposition, value = f'form-data; name="{name}"', value.encode()
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize(("build", "status", "param", "words"), [u[1:] for u in UPLOADS],
                         ids=[u[0] for u in UPLOADS])
def test_bad_upload(server, build, status, param, words):
    body, content_type = multipart(build(good_files(server)))
    r = httpx.post(f"{server.url}/v1/adapters", content=body, headers={"Content-Type": content_type},
                   timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    for word in words:
        assert word in error["message"], (word, error["message"])


def test_upload_not_multipart(server):
    r = httpx.post(f"{server.url}/v1/adapters", json={"adapter_id": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "content-type"


def test_upload_malformed_multipart(server):
    r = httpx.post(f"{server.url}/v1/adapters", content=b"--nope\r\ngarbage",
                   headers={"Content-Type": "multipart/form-data; boundary=other"})
    assert r.status_code == 400 and r.json()["error"]["param"] in ("file", "adapter_id")


def test_upload_over_the_cap_while_streaming(server):
    big = b"\0" * (UPLOAD_CAP + 2**20)
    body, content_type = multipart([("adapter_id", "big"), (FILES[0], b"{}"), (FILES[1], big)])
    chunks = (body[i:i + 65536] for i in range(0, len(body), 65536))  # chunked: no Content-Length
    r = httpx.post(f"{server.url}/v1/adapters", content=chunks, headers={"Content-Type": content_type})
    assert r.status_code == 413 and "max_upload_bytes" in r.json()["error"]["message"]


def raw_exchange(url: str, head: bytes, body_part: bytes, wait: float) -> bytes:
    """Send ``head`` and the first ``body_part`` of a longer body, stall, and read the answer."""
    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=wait + 30) as sock:
        sock.sendall(head + body_part)
        time.sleep(wait)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


@pytest.mark.parametrize("path", ["/v1/adapters", "/v1/completions"])
def test_slow_body_gets_408(server, path):
    u = urlparse(server.url)
    content_type = "multipart/form-data; boundary=b" if path == "/v1/adapters" else "application/json"
    head = (f"POST {path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: {content_type}\r\n"
            "Content-Length: 100000\r\n\r\n").encode()
    answer = raw_exchange(server.url, head, b"--b\r\nContent-Disposition: form-data; name=\"adapter_id\"\r\n",
                          READ_TIMEOUT + 2)
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b"request_read_timeout" in rest and b"connection: close" in rest.lower()


def test_header_beyond_the_parser_limit_is_refused_and_harmless(server):
    with pytest.raises(httpx.TransportError):
        r = httpx.get(f"{server.url}/v1/models", headers={"X-Huge": "a" * 200_000})
        assert r.status_code in (400, 431)  # if the answer arrives before the reset
        raise httpx.TransportError("answered")
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_server_healthy_and_store_unchanged(server):
    """Runs last in this module: nothing above left a trace in the store or broke the server."""
    assert snapshot(server.store_dir) == server.store_before
    assert [a["id"] for a in httpx.get(f"{server.url}/v1/adapters").json()["data"]] == [KNOWN]
    r = httpx.post(f"{server.url}/v1/completions", json=cmpl(adapter_id=KNOWN, temperature=0))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    assert httpx.get(f"{server.url}/ready").status_code == 200
    assert "Traceback" not in server.log()
