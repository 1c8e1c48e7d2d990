"""kill -9 anywhere on the upload, replace and delete paths, then a restart: the store is consistent,
no partial adapter is visible, every committed adapter serves the same text as before, and what was
acknowledged (a 2xx) is there.

Real server processes over one store directory (a tiny random Llama, so that a restart takes
seconds). Each trial starts a server with one failpoint armed to SIGKILL it
(adapter_store/failpoints.py), checks everything the previous kill left, makes one acknowledged
change, then runs the operation that dies. Every point in ``failpoints.POINTS`` is hit; a few more
trials kill the server after a seeded random delay while a slow client streams an upload and the
commit path is slowed down.
"""

from __future__ import annotations

import math
import random
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from peft import LoraConfig

from adapter_store.failpoints import ENV, POINTS
from adapter_store.integrity import verify_version
from adapter_store.refs import StoredAdapterMeta, decode
from adapter_store.staging import Staging
from benchmarks.topology import Replica, start_replica
from tests.engine_helpers import tiny_llama_dir
from tests.peft_helpers import build_adapters

pytestmark = pytest.mark.slow

FILES = ("adapter_config.json", "adapter_model.safetensors")
PROMPT = [5, 9, 3, 17]
ARGS = ["--dtype", "float32", "--pool-bytes", "16MiB", "--max-num-seqs", "4"]
SLOW_COMMIT = ",".join(f"{p}=sleep:0.1" for p in POINTS if p.startswith(("stage.", "commit.", "ref.")))
# Killed at one of these, the operation had taken effect (the ref was renamed); anywhere else, not.
EFFECTIVE = {"ref.renamed", "commit.done", "upload.committed"}
TRANSPORT_ERRORS = (httpx.TransportError,)


@dataclass
class World:
    """What the store must hold: stored id -> content name; texts by content name."""

    workdir: Path
    model: Path
    sources: dict[str, Path]
    texts: dict[str, tuple] = field(default_factory=dict)
    expected: dict[str, str] = field(default_factory=dict)
    runs: int = 0

    @property
    def store(self) -> Path:
        return self.workdir / "store"

    def start(self, failpoints: str = "") -> Replica:
        self.runs += 1
        env = {"OMP_WAIT_POLICY": "PASSIVE", ENV: failpoints}
        r = start_replica(f"run{self.runs}", self.workdir, self.store, ["--model", str(self.model), *ARGS],
                          threads=1, env=env)
        r.wait_ready(120)
        return r


def text(url: str, model: str) -> tuple:
    """What ``model`` serves: greedy text and the chosen tokens' logprobs (a random tiny model's
    text is mostly undecodable bytes, so text alone could match across adapters)."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "logprobs": 0}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["text"], tuple(round(lp, 3) for lp in choice["logprobs"]["token_logprobs"])


def multipart(world: World, adapter_id: str, content: str, replace: bool) -> tuple[bytes, dict[str, str]]:
    src = world.sources[content]
    files = {n: (n, (src / n).read_bytes(), "application/octet-stream") for n in FILES}
    data = {"adapter_id": adapter_id, **({"replace": "true"} if replace else {})}
    req = httpx.Request("POST", "http://x/v1/adapters", files=files, data=data)
    return req.read(), {"content-type": req.headers["content-type"]}


def upload(url: str, world: World, adapter_id: str, content: str, replace: bool = False,
           chunk_delay: float = 0.0) -> httpx.Response:
    body, headers = multipart(world, adapter_id, content, replace)
    if not chunk_delay:
        return httpx.post(f"{url}/v1/adapters", content=body, headers=headers, timeout=60)

    def slowly():
        for i in range(0, len(body), 4096):
            time.sleep(chunk_delay)
            yield body[i:i + 4096]

    return httpx.post(f"{url}/v1/adapters", content=slowly(), headers=headers, timeout=60)


def check_store_on_disk(root: Path) -> None:
    """No partial version, every live ref names a whole version, every staging leftover is an
    abandoned upload (its writer is dead), and refs hold whole records."""
    for version in (root / "versions").iterdir():
        verify_version(version)  # a version directory appears only complete (a rename of staging)
    for ref in (root / "refs").glob("*.json"):
        record = decode(ref.read_bytes())
        if isinstance(record, StoredAdapterMeta):
            assert (root / "versions" / record.version).is_dir(), ref.name
    staging = Staging(root / "staging", min_age=0)
    staging.sweep(math.inf)
    assert list((root / "staging").iterdir()) == []


def check(world: World, url: str) -> None:
    listed = {a["id"] for a in httpx.get(f"{url}/v1/adapters", timeout=30).json()["data"]}
    assert listed == set(world.expected)
    for adapter_id, content in sorted(world.expected.items()):
        assert text(url, adapter_id) == world.texts[content], adapter_id
    check_store_on_disk(world.store)


@pytest.fixture(scope="module")
def world(tmp_path_factory, smollm2_tokenizer_dir) -> World:
    tmp = tmp_path_factory.mktemp("crash")
    model, base = tiny_llama_dir(tmp / "model", smollm2_tokenizer_dir)
    configs = {c: LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]) for c in "KABX"}
    _, sources = build_adapters(base, configs, tmp / "adapters", std=0.5)
    w = World(tmp / "run", model, sources)
    r = w.start()
    try:
        for adapter_id, content in [("keep", "K"), ("victim", "A"), ("b-ref", "B"), ("x-ref", "X"),
                                    *((f"gone-{i}", "K") for i in range(8))]:
            assert upload(r.url, w, adapter_id, content).status_code == 201
            w.texts.setdefault(content, text(r.url, adapter_id))
            w.expected[adapter_id] = content
        assert len(set(w.texts.values())) == 4  # the adapters differ in what they serve
        # X's version goes, so that uploads of X below pass the version rename again.
        x_version = decode((w.store / "refs" / "x-ref.json").read_bytes()).version
        assert httpx.delete(f"{r.url}/v1/adapters/x-ref", timeout=30).status_code == 200
        del w.expected["x-ref"]
    finally:
        r.kill()
        r.wait()
    shutil.rmtree(w.store / "versions" / x_version)  # what the garbage collector does later
    return w


def acknowledged_change(world: World, url: str, trial: int, point: str) -> None:
    """A change that gets its 2xx just before the crash (and doesn't pass ``point``, which would
    kill it): it must be there after the restart. Uploads and deletes both pass the ref points."""
    if point.startswith("ref."):
        return
    if point.startswith("delete."):
        assert upload(url, world, f"ack-{trial}", "K").status_code == 201
        world.expected[f"ack-{trial}"] = "K"
        return
    gone = min(i for i in world.expected if i.startswith("gone-"))
    assert httpx.delete(f"{url}/v1/adapters/{gone}", timeout=30).status_code == 200
    del world.expected[gone]


# (failpoint, operation): every point at least once, uploads of X first (its version is new).
TRIALS = [*((p, "upload") for p in POINTS[:POINTS.index("commit.version_renamed") + 1]),
          ("ref.tmp_written", "replace"), ("ref.renamed", "replace"), ("commit.done", "replace"),
          ("upload.committed", "replace"), ("delete.locked", "delete"), ("ref.tmp_written", "delete"),
          ("ref.renamed", "delete")]


def dying_operation(world: World, url: str, op: str, trial: int) -> tuple[str, str | None]:
    """Run ``op``; returns (id, content the id has if the op took effect; None: deleted)."""
    if op == "upload":
        adapter_id, content = f"new-{trial}", "X"
        call = lambda: upload(url, world, adapter_id, content)  # noqa: E731
    elif op == "replace":
        adapter_id, content = "victim", "B" if world.expected["victim"] == "A" else "A"
        call = lambda: upload(url, world, adapter_id, content, replace=True)  # noqa: E731
    else:
        adapter_id, content = "keep", None
        call = lambda: httpx.delete(f"{url}/v1/adapters/keep", timeout=30)  # noqa: E731
    with pytest.raises(TRANSPORT_ERRORS):
        call()
    return adapter_id, content


def apply(world: World, adapter_id: str, content: str | None) -> None:
    if content is None:
        world.expected.pop(adapter_id, None)
    else:
        world.expected[adapter_id] = content


def test_kill_at_every_failpoint_then_restart(world):
    assert {p for p, _ in TRIALS} == set(POINTS)
    for trial, (point, op) in enumerate(TRIALS):
        r = world.start(f"{point}=kill")
        try:
            check(world, r.url)
            acknowledged_change(world, r.url, trial, point)
            adapter_id, content = dying_operation(world, r.url, op, trial)
            assert r.wait(60) == -9, f"{point}: the server did not die there"
        finally:
            r.kill()
        if point in EFFECTIVE:
            apply(world, adapter_id, content)
    r = world.start()
    try:
        check(world, r.url)
        if "keep" not in world.expected:  # put back what the delete trials took, for the next test
            assert upload(r.url, world, "keep", "K").status_code == 201
            world.expected["keep"] = "K"
    finally:
        r.kill()
        r.wait()


def test_kill_after_random_delays_during_slow_uploads(world):
    """The kill lands anywhere from the body streaming in to after the commit; after the restart
    the id has its old state or its new one, whole, and the new one if the client got its 201.
    Each trial's server is also the restart that checks the trial before it."""
    rng = random.Random(12)
    previous: tuple[str, bool] | None = None
    for trial in range(3):
        last = trial == 2
        r = world.start("" if last else SLOW_COMMIT)
        try:
            if previous is not None:
                observe(world, r.url, *previous)
            check(world, r.url)
            if not last:
                adapter_id = f"slow-{trial}"
                previous = (adapter_id, slow_upload_killed(world, r, adapter_id, rng.uniform(0.05, 1.2)))
        finally:
            r.kill()
            r.wait()


def slow_upload_killed(world: World, r: Replica, adapter_id: str, delay: float) -> bool:
    """Stream an upload slowly and SIGKILL the server ``delay`` seconds in (the body takes ~0.2 s,
    then ~0.6 s of slowed staging and commit). Whether the client got its 201."""
    result: list[httpx.Response] = []

    def send() -> None:
        try:
            result.append(upload(r.url, world, adapter_id, "B", chunk_delay=0.02))
        except httpx.TransportError:
            pass

    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(delay)
    r.kill()
    sender.join(60)
    return bool(result) and result[0].status_code == 201


def observe(world: World, url: str, adapter_id: str, acknowledged: bool) -> None:
    listed = {a["id"] for a in httpx.get(f"{url}/v1/adapters", timeout=30).json()["data"]}
    assert acknowledged <= (adapter_id in listed), f"{adapter_id} was acknowledged and is lost"
    if adapter_id in listed:
        world.expected[adapter_id] = "B"
