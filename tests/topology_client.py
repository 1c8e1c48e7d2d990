"""The HTTP side of tests/test_topology.py: requests to replicas and balancers, streams held open,
and the constants both topologies share (``LORA_TOPOLOGY``: local processes or the compose stack)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx

MODE = os.environ.get("LORA_TOPOLOGY", "local")  # local | compose
KEY = "topology-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}  # every replica requires it: an admin key
PROMPT = [72, 101, 108, 108, 111, 44, 32, 119]  # token ids: the tiny model has a 256-token vocab
LONG = 1000 if MODE == "local" else 300  # tokens of a stream still running while something else happens
TIMEOUT = 120 if MODE == "local" else 600  # SmolLM2 on one thread per container is slow when the host is busy
FILES = ("adapter_config.json", "adapter_model.safetensors")


def upload(url: str, adapter_id: str, directory: Path, replace: bool = False,
           headers: dict[str, str] | None = None) -> httpx.Response:
    files = {name: (name, (directory / name).read_bytes(), "application/octet-stream") for name in FILES}
    data = {"adapter_id": adapter_id, **({"replace": "true"} if replace else {})}
    return httpx.post(f"{url}/v1/adapters", files=files, data=data, headers={**AUTH, **(headers or {})},
                      timeout=TIMEOUT)


def complete(url: str, model: str | None = None, max_tokens: int = 12, **extra) -> httpx.Response:
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **extra}
    if model is not None:
        body["model"] = model
    return httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=TIMEOUT)


def text_of(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def listed(url: str) -> list[str]:
    return [a["id"] for a in httpx.get(f"{url}/v1/adapters", headers=AUTH).json()["data"]]


def served_by(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.headers["x-served-by"]


async def hold_streams(url: str, model: str, n: int) -> list[str]:
    """Send ``n`` streams for ``model`` at once and return the replica of each; every stream stays
    open until all have answered, so the balancer routes each while the others are in flight."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": 200, "temperature": 0, "ignore_eos": True,
            "stream": True}
    answered, everyone = [], asyncio.Event()
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(timeout=TIMEOUT, headers=AUTH, limits=limits) as client:
        async def one() -> None:
            async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                assert r.status_code == 200
                answered.append(r.headers["x-served-by"])
                if len(answered) == n:
                    everyone.set()
                await everyone.wait()

        await asyncio.gather(*(one() for _ in range(n)))
    return answered


def running(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return next(float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("lora_server_num_requests_running"))


def open_stream(url: str, model: str, max_tokens: int = LONG) -> tuple[httpx.Response, Iterator[str], str]:
    """A long greedy stream; returns the response, its line iterator and the first event's text."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    response = httpx.Client(timeout=TIMEOUT).send(
        httpx.Request("POST", f"{url}/v1/completions", json=body, headers=AUTH), stream=True)
    assert response.status_code == 200, response.read()
    lines = response.iter_lines()
    first = next(line for line in lines if line)
    return response, lines, json.loads(first.removeprefix("data: "))["choices"][0]["text"]


def finish_stream(lines: Iterator[str], first: str) -> tuple[str, str]:
    """Read a stream to its end: (full text, finish reason)."""
    texts, reason = [first], None
    for line in lines:
        if not line or line == "data: [DONE]":
            continue
        choice = json.loads(line.removeprefix("data: "))["choices"][0]
        texts.append(choice["text"])
        reason = choice["finish_reason"] or reason
    return "".join(texts), reason
