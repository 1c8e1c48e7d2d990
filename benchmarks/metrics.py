"""Per-request timings -> the reported metrics (stdlib only: the vLLM worker uses it too)."""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass, field


@dataclass
class RequestTiming:
    """Wall-clock times (``time.perf_counter``) of one request's life."""

    sent: float
    token_times: list[float] = field(default_factory=list)  # when each output token (or chunk) arrived
    num_tokens: int = 0  # output tokens (a streamed chunk may carry several)

    def ttft(self) -> float | None:
        return self.token_times[0] - self.sent if self.token_times else None

    def itls(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t[:-1], t[1:], strict=True)]


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile ``q`` in [0, 100]; None for no values."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize(timings: list[RequestTiming], wall: float, peak_rss_bytes: int | None) -> dict:
    """Throughput, latency percentiles (ms), peak RSS (MiB), and the raw TTFTs for CDF plots."""
    tokens = sum(t.num_tokens for t in timings)
    ttfts = [x for t in timings if (x := t.ttft()) is not None]
    itls = [x for t in timings for x in t.itls()]
    ms = 1000.0

    def pct(values: list[float], q: float) -> float | None:
        p = percentile(values, q)
        return None if p is None else p * ms

    return {
        "requests": len(timings), "output_tokens": tokens, "wall_s": wall,
        "tok_s": tokens / wall if wall > 0 else 0.0, "req_s": len(timings) / wall if wall > 0 else 0.0,
        "ttft_p50_ms": pct(ttfts, 50), "ttft_p99_ms": pct(ttfts, 99),
        "itl_p50_ms": pct(itls, 50), "itl_p99_ms": pct(itls, 99),
        "peak_rss_mib": None if peak_rss_bytes is None else peak_rss_bytes / 2**20,
        "ttfts_ms": sorted(x * ms for x in ttfts),
    }


def self_peak_rss() -> int:
    """This process's peak resident set size in bytes (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def pid_peak_rss(pid: int) -> int | None:
    """Peak RSS (VmHWM) of another live process, in bytes; None if unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cpu_note() -> str:
    """One line on the machine load when a measurement starts (numbers are noisy on shared cores)."""
    load1, _, _ = os.getloadavg()
    return f"loadavg1={load1:.2f} cores={os.cpu_count()}"
