"""The machine's own limits, measured in the benchmark's run: GEMM peak of the prepacked path and read
bandwidth. ``python -m benchmarks.machine [--threads 2] [--out FILE]`` prints them (and writes JSON).

* GEMM peak: the GFLOP/s of the model's own step GEMMs through ``server.layers.Linear`` (oneDNN,
  weights prepacked, as the engine runs them), with nothing else: per round, every layer's four
  fused linears (q/k/v, o, gate/up, down) with distinct weights (as the model streams them from
  memory) and, for decode, the LM head. At ``DECODE_ROWS`` rows (a decode step of 64 requests)
  and ``PREFILL_ROWS`` (a full prefill chunk), in fp32 and, where oneDNN has a native bf16 GEMM
  here, bf16. Best of a few rounds: a peak is what the cores can do when nothing else runs.
* Read bandwidth: ``sum`` over a buffer far larger than the last-level cache, on the same threads.

``model_flops`` is the FLOP count the benchmark divides by: 2 x the weights a token's rows meet in the
layers' linears, plus the LM head for each sampled row (attention score/value products are left out:
under 3% of a step at these context lengths).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DECODE_ROWS = 64
PREFILL_ROWS = 512
ISA = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
PREFILL_LAYERS = 4
BANDWIDTH_BYTES = 1 << 29  # 512 MiB: 16x the 32 MiB L3 of the machines this runs on


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP count needs of a model: its linears' (out, in) per layer, layers, LM head."""

    layer_linears: tuple[tuple[int, int], ...]
    num_layers: int
    vocab_size: int
    hidden_size: int

    @classmethod
    def smollm2(cls) -> ModelShape:
        return cls(((960, 576), (576, 576), (3072, 576), (576, 1536)), 30, 49152, 576)

    @property
    def layer_flops_per_token(self) -> int:
        return 2 * self.num_layers * sum(o * i for o, i in self.layer_linears)

    @property
    def head_flops_per_row(self) -> int:
        return 2 * self.vocab_size * self.hidden_size


def model_flops(shape: ModelShape, tokens: int, sampled: int) -> int:
    """FLOPs of a step (or a run) that computes ``tokens`` tokens and samples ``sampled`` rows."""
    return tokens * shape.layer_flops_per_token + sampled * shape.head_flops_per_row


@dataclass(frozen=True)
class MachineLimits:
    cpu: str
    cores: int
    threads: int
    isa: tuple[str, ...]
    gemm_gflops: dict[str, dict[str, float]]  # dtype -> {"decode": ..., "prefill": ...}
    read_gbs: float
    torch: str

    def line(self) -> str:
        peaks = "; ".join(f"{dt} GEMM {v['decode']:.0f} (decode, {DECODE_ROWS} rows) / {v['prefill']:.0f} "
                          f"(prefill, {PREFILL_ROWS} rows) GFLOP/s" for dt, v in self.gemm_gflops.items())
        return (f"{self.cpu}, {self.cores} cores, {self.threads} threads; flags {' '.join(self.isa) or '-'}; "
                f"{peaks}; read {self.read_gbs:.1f} GB/s; torch {self.torch}")


def cpu_model() -> tuple[str, tuple[str, ...]]:
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name in ("", platform.machine(), platform.processor()):
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return name, tuple(f for f in ISA if f in flags)


def gemm_gflops(shape: ModelShape, dtype, rows_list: tuple[int, ...] = (DECODE_ROWS, PREFILL_ROWS),
                rounds: int = 3) -> dict[int, float]:
    """Best GFLOP/s over ``rounds`` rounds of the model's GEMMs, per row count (the LM head only at
    decode-sized row counts: a prefill chunk samples one row)."""
    import torch

    from server.layers import Linear

    def weight(o: int, i: int) -> torch.Tensor:
        return torch.empty(o, i, dtype=dtype).uniform_(-0.05, 0.05)

    layers = [[Linear(weight(o, i), prepack=True) for o, i in shape.layer_linears]
              for _ in range(shape.num_layers)]
    head = Linear(weight(shape.vocab_size, shape.hidden_size), prepack=True)
    out = {}
    for rows in rows_list:
        xs = [torch.empty(rows, i, dtype=dtype).uniform_(-1, 1) for _, i in shape.layer_linears]
        with_head = rows <= DECODE_ROWS
        # Prefill-sized GEMMs reuse each weight hundreds of times (compute-bound whether or not the
        # weights are cached): a few layers measure them, in a fraction of the time.
        used = layers if with_head else layers[:PREFILL_LAYERS]
        flops = (rows * shape.layer_flops_per_token * len(used) // shape.num_layers
                 + (rows * shape.head_flops_per_row if with_head else 0))
        best = 0.0
        for r in range(rounds + 1):  # the first round warms oneDNN's kernel caches
            start = time.perf_counter()
            for layer in used:
                for lin, x in zip(layer, xs, strict=True):
                    lin(x)
            if with_head:
                head(xs[0])
            if r:
                best = max(best, flops / (time.perf_counter() - start) / 1e9)
        out[rows] = best
    return out


def read_bandwidth(repeat: int = 5) -> float:
    """GB/s of a multi-threaded sum over a buffer far larger than the caches (best of ``repeat``)."""
    probe = BandwidthProbe()
    return max(probe.sample() for _ in range(repeat))


class BandwidthProbe:
    """One read-bandwidth sample at a time, for pairing with a measurement taken right after it.

    Why: on the shared VMs this runs on, the read bandwidth itself moves between runs and within
    one (21-48 GB/s minutes apart, while the LoRA kernel's times stayed within +-10%), so a kernel
    timed in one minute against a probe taken in another gives a ratio that flips with the probe.
    A sample before each kernel repeat pairs them in time (it also leaves the caches cold for the
    kernel, as a decode step finds them)."""

    def __init__(self) -> None:
        import torch

        self.buf = torch.ones(BANDWIDTH_BYTES // 4, dtype=torch.float32)
        self.buf.sum()  # pages touched, threads started

    def sample(self) -> float:
        start = time.perf_counter()
        self.buf.sum()
        return BANDWIDTH_BYTES / (time.perf_counter() - start) / 1e9


def bf16_gemm_native() -> bool:
    """Whether oneDNN runs bf16 GEMMs in hardware here (AVX-512 BF16 or AMX), not emulated."""
    import torch

    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def measure(threads: int) -> MachineLimits:
    import torch

    torch.set_num_threads(threads)
    shape = ModelShape.smollm2()
    dtypes = [torch.float32] + ([torch.bfloat16] if bf16_gemm_native() else [])
    gemm = {}
    for dt in dtypes:
        peaks = gemm_gflops(shape, dt)
        gemm[str(dt).removeprefix("torch.")] = {"decode": peaks[DECODE_ROWS], "prefill": peaks[PREFILL_ROWS]}
    name, isa = cpu_model()
    return MachineLimits(name, os.cpu_count() or 1, threads, isa, gemm, read_bandwidth(), torch.__version__)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="write the limits as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    limits = measure(args.threads)
    if args.out:
        args.out.write_text(json.dumps(asdict(limits)))
    log.info("machine: %s", limits.line())


if __name__ == "__main__":
    main()
