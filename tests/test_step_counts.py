"""Counted, not argued: what one engine step on the Triton backend costs the host.

A tiny Llama runs one decode step and one mixed prefill + decode step through ``ModelRunner.execute``
with the Triton attention and LoRA backends (TRITON_INTERPRET=1 on CPU), while
benchmarks/step_counter.py counts Triton launches, host->device transfers and syncs. The LoRA work
must not grow with the number of distinct adapters (1, 8, 32), transfers must not grow with layers
or adapters, and the forward must neither wait for the device nor make tensors from Python data.
``python -m benchmarks.step_counts`` prints the same counts for SmolLM2's shape.
"""

import pytest

from benchmarks.step_counts import SHAPES, build_setup, count_steps

pytestmark = pytest.mark.slow
pytest.importorskip("kernels.triton_lora")

PER_LAYER = 2 + 2 * 4  # store_kv + attention; a shrink and an expand for each of 4 groups


def _counts(layers: int, adapters: int, run_kernels: bool) -> dict:
    setup = build_setup({**SHAPES["tiny"], "num_hidden_layers": layers}, adapters)
    return count_steps(setup, run_kernels)


@pytest.fixture(scope="module")
def counts() -> dict:
    # Adapter counts 1 and 8 with the kernels executed; 32 and the 4-layer model counted only.
    return {(2, 1): _counts(2, 1, True), (2, 8): _counts(2, 8, True), (2, 32): _counts(2, 32, False),
            (4, 8): _counts(4, 8, False)}


def test_launches_per_step_bounded_by_layers_and_independent_of_adapters(counts):
    for (layers, _), c in counts.items():
        for step in ("decode", "mixed"):
            assert c[step]["step"]["num_launches"] <= PER_LAYER * layers
            assert c[step]["step"]["num_launches"] == c[step]["forward"]["num_launches"]  # all in forward
    for step in ("decode", "mixed"):
        launches = [counts[(2, n)][step]["step"]["launches"] for n in (1, 8, 32)]
        assert launches[0] == launches[1] == launches[2]
        assert launches[0]["_shrink_kernel"] == launches[0]["_expand_kernel"] == 4 * 2  # per group and layer
    four, two = counts[(4, 8)]["decode"]["step"], counts[(2, 8)]["decode"]["step"]
    assert four["num_launches"] == 2 * two["num_launches"]


def test_host_to_device_transfers_constant_and_none_in_the_forward(counts):
    for c in counts.values():
        for step in ("decode", "mixed"):
            # the step buffer's one upload, and the sampler's row index (after the forward)
            assert c[step]["step"]["h2d"] == 2
            assert c[step]["forward"]["h2d"] == 0
            assert c[step]["forward"]["host_tensors"] == 0


def test_no_sync_inside_the_forward(counts):
    for c in counts.values():
        for step in ("decode", "mixed"):
            assert c[step]["forward"]["syncs"] == 0
            assert c[step]["step"]["syncs"] == 1  # sampling reads the chosen tokens back, once


def test_counts_do_not_depend_on_executing_the_kernels():
    assert _counts(2, 1, True) == _counts(2, 1, False)
