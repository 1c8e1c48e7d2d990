"""SamplingParams validation and Sampler semantics. CPU only, fast, deterministic (fixed seeds)."""

from __future__ import annotations

import math

import pytest
import torch

from server.errors import InvalidRequest
from server.sampling import Sampler, make_generator, mask_top_k_top_p, sorted_candidates
from server.sampling_params import SamplingParams

CPU = torch.device("cpu")


# ---------------------------------------------------------------- SamplingParams

@pytest.mark.parametrize("field,value,fragment", [
    ("max_tokens", 0, ">= 1"),
    ("max_tokens", 1.5, ">= 1"),
    ("temperature", -0.1, "[0, 2]"),
    ("temperature", 2.5, "[0, 2]"),
    ("temperature", float("nan"), "[0, 2]"),
    ("top_p", 0.0, "(0, 1]"),
    ("top_p", 1.01, "(0, 1]"),
    ("top_k", -2, ">= 1"),
    ("seed", 2**64, "2**64"),
    ("seed", "7", "2**64"),
    ("logprobs", 21, "[0, 20]"),
    ("logprobs", -1, "[0, 20]"),
    ("min_tokens", -1, "[0, max_tokens=16]"),
    ("min_tokens", 17, "[0, max_tokens=16]"),
    ("stop", ("a",) * 17, "at most 16"),
    ("stop", ("ok", ""), "non-empty"),
    ("stop_token_ids", (3, -1), ">= 0"),
    ("ignore_eos", "yes", "boolean"),
])
def test_invalid_field_names_field_and_range(field: str, value: object, fragment: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        SamplingParams(**{field: value})
    assert info.value.param == field
    assert info.value.status == 400
    assert field in info.value.message and fragment in info.value.message


def test_valid_params_and_normalization() -> None:
    p = SamplingParams(temperature=0, top_k=0, top_p=1.0, seed=-3, stop="###", stop_token_ids=[2],
                       logprobs=0, min_tokens=16)
    assert p.stop == ("###",) and p.stop_token_ids == (2,)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert p.is_greedy
    assert SamplingParams(top_k=1).is_greedy
    assert not SamplingParams().is_greedy
    with pytest.raises(AttributeError):
        p.temperature = 1.0  # type: ignore[misc]


# ---------------------------------------------------------------- Sampler helpers

def _sample(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int | None],
            banned: list[tuple[int, ...]] | None = None, sampler: Sampler | None = None) -> list[int]:
    gens = [make_generator(s, CPU) for s in seeds]
    return (sampler or Sampler()).sample(logits, params, gens, banned).token_ids


def _steps(logits: torch.Tensor, rows: list[SamplingParams], seeds: list[int | None],
           steps: int) -> list[list[int]]:
    """Tokens per row over ``steps`` draws, each row keeping its generator across steps."""
    gens = [make_generator(s, CPU) for s in seeds]
    sampler = Sampler(seed=99)
    out = [sampler.sample(logits, rows, gens).token_ids for _ in range(steps)]
    return [list(col) for col in zip(*out, strict=True)]


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# ---------------------------------------------------------------- greedy

def test_greedy_equals_argmax_and_breaks_ties_low() -> None:
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(0))
    logits[3, [7, 42]] = 50.0  # tie: torch.argmax and we both pick 7
    ids = _sample(logits, [SamplingParams(temperature=0)] * 8, [None] * 8)
    assert ids == logits.argmax(dim=-1).tolist()
    assert ids[3] == 7


def test_greedy_rows_consume_no_randomness() -> None:
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(1))
    gen = make_generator(5, CPU)
    sampler = Sampler()
    before, default_before = gen.get_state(), sampler.default_generator(CPU).get_state()
    sampler.sample(logits, [SamplingParams(temperature=0, seed=5), SamplingParams(top_k=1)],
                   [gen, None])
    assert torch.equal(gen.get_state(), before)
    assert torch.equal(sampler.default_generator(CPU).get_state(), default_before)


def test_top_k_1_and_tiny_top_p_equal_greedy() -> None:
    logits = torch.randn(16, 200, generator=torch.Generator().manual_seed(2))
    expected = logits.argmax(dim=-1).tolist()
    for seed in range(5):
        assert _sample(logits, [SamplingParams(top_k=1, seed=seed)] * 16, [seed] * 16) == expected
        assert _sample(logits, [SamplingParams(top_p=1e-6)] * 16, [seed] * 16) == expected
    # The filter itself, not only the is_greedy shortcut, keeps just the argmax for k = 1.
    values, ids = sorted_candidates(logits, 200)
    masked = mask_top_k_top_p(values, torch.ones(16, dtype=torch.long), torch.full((16,), 2.0))
    assert masked.isfinite().sum(dim=-1).tolist() == [1] * 16
    assert ids[:, 0].tolist() == expected


# ---------------------------------------------------------------- seeds

@pytest.mark.parametrize("p", [
    SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=1234),  # topk candidates
    SamplingParams(temperature=0.9, top_p=0.95, seed=1234),  # full-sort candidates
    SamplingParams(temperature=1.2, seed=1234),  # no filter: token-id order
])
def test_same_seed_same_tokens_in_any_batch(p: SamplingParams) -> None:
    g = torch.Generator().manual_seed(3)
    target, others = torch.randn(1, 300, generator=g), torch.randn(3, 300, generator=g)
    alone = _steps(target, [p], [1234], steps=12)[0]
    # Neighbours change the candidate count K (top_k 200, top_p only) and the draw paths.
    unseeded, greedy = SamplingParams(temperature=1.5, top_p=0.8), SamplingParams(temperature=0)
    seeded_other = SamplingParams(seed=7, top_k=200)
    layouts = [  # (rows, params, seeds, index of the target row)
        (torch.cat([others[:1], target]), [unseeded, p], [None, 1234], 1),
        (torch.cat([target, others]), [p, greedy, seeded_other, unseeded], [1234, None, 7, None], 0),
        (torch.cat([others, target]), [seeded_other, SamplingParams(), greedy, p], [7, None, None, 1234], 3),
    ]
    for rows, params, seeds, at in layouts:
        assert _steps(rows, params, seeds, steps=12)[at] == alone
    assert len(set(alone)) > 1  # the test would be vacuous if the row were effectively greedy


def test_sorted_candidates_topk_matches_full_sort_with_ties() -> None:
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(8))
    logits[2, [250, 10, 99]] = 9.0  # a three-way tie at the top: ids ascending
    full_values, full_ids = sorted_candidates(logits, 300)
    values, ids = sorted_candidates(logits, 40)
    assert torch.equal(values, full_values[:, :40]) and torch.equal(ids, full_ids[:, :40])
    assert ids[2, :3].tolist() == [10, 99, 250]


def test_different_seeds_differ_on_flat_distribution() -> None:
    flat = torch.zeros(1, 1000)
    seqs = [tuple(_steps(flat, [SamplingParams(seed=s)], [s], steps=8)[0]) for s in range(20)]
    assert len(set(seqs)) == 20
    first_tokens = {seq[0] for seq in seqs}
    assert len(first_tokens) >= 17  # 20 draws from 1000: collisions are rare


# ---------------------------------------------------------------- distribution

PROBS = torch.tensor([0.5, 0.25, 0.15, 0.1])
CHI2_DF3_P001 = 16.27  # chi-square critical value, 3 degrees of freedom, p = 0.001


@pytest.mark.parametrize("params,expected", [
    (SamplingParams(), PROBS),
    (SamplingParams(temperature=2.0), PROBS.sqrt() / PROBS.sqrt().sum()),
    (SamplingParams(temperature=0.5), PROBS**2 / (PROBS**2).sum()),
    (SamplingParams(top_k=2), torch.tensor([2 / 3, 1 / 3, 0.0, 0.0])),
    # mass before token 2 is 0.75 >= 0.7, so the nucleus is {0, 1}
    (SamplingParams(top_p=0.7), torch.tensor([2 / 3, 1 / 3, 0.0, 0.0])),
    (SamplingParams(top_k=3, top_p=0.95), torch.tensor([0.5, 0.25, 0.15, 0.0]) / 0.9),
])
def test_frequencies_match_distribution(params: SamplingParams, expected: torch.Tensor) -> None:
    n = 20000
    logits = PROBS.log().expand(n, 4).contiguous()
    ids = _sample(logits, [params] * n, [None] * n, sampler=Sampler(seed=0))
    counts = torch.bincount(torch.tensor(ids), minlength=4).float()
    support = expected > 0
    assert counts[~support].sum() == 0
    assert _chi_square(counts[support], expected[support]) < CHI2_DF3_P001


def test_seeded_rows_are_unbiased() -> None:
    # Same check through the per-row generator path: row i has seed i.
    n = 4000
    logits = PROBS.log().expand(n, 4).contiguous()
    ids = _sample(logits, [SamplingParams()] * n, list(range(n)))
    counts = torch.bincount(torch.tensor(ids), minlength=4).float()
    assert _chi_square(counts, PROBS) < CHI2_DF3_P001


def test_top_k_top_p_never_sample_outside_allowed_set() -> None:
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(64, 50, generator=g) * 2
    probs = logits.softmax(dim=-1)
    for seed in range(10):
        ids = _sample(logits, [SamplingParams(top_k=5)] * 64, [None] * 64, sampler=Sampler(seed))
        topk = logits.topk(5, dim=-1).indices.tolist()
        assert all(t in allowed for t, allowed in zip(ids, topk, strict=True))
        ids = _sample(logits, [SamplingParams(top_p=0.5, temperature=1.0)] * 64, [seed] * 64)
        for row, t in enumerate(ids):
            ordered = probs[row].argsort(descending=True).tolist()
            mass, allowed = 0.0, []
            for tok in ordered:
                allowed.append(tok)
                mass += float(probs[row, tok])
                if mass >= 0.5:
                    break
            assert t in allowed


# ---------------------------------------------------------------- logprobs, dtypes, banned

def test_logprobs_are_raw_log_softmax_with_sorted_top_k() -> None:
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(5))
    params = [SamplingParams(logprobs=5, temperature=0.3, top_k=10), SamplingParams(),
              SamplingParams(logprobs=0, temperature=0), SamplingParams(logprobs=20, seed=1)]
    result = Sampler().sample(logits, params, [None, None, None, make_generator(1, CPU)])
    ref = logits.log_softmax(dim=-1)
    assert result.logprobs[1] is None
    for row, k in [(0, 5), (2, 0), (3, 20)]:
        lp = result.logprobs[row]
        assert lp is not None and lp.token_id == result.token_ids[row]
        assert math.isclose(lp.logprob, float(ref[row, lp.token_id]), abs_tol=1e-5)
        assert len(lp.top) == k
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        assert [t for t, _ in lp.top] == ref[row].topk(k).indices.tolist()
        for t, v in lp.top:
            assert math.isclose(v, float(ref[row, t]), abs_tol=1e-5)


def test_bf16_logits() -> None:
    logits = torch.randn(6, 128, generator=torch.Generator().manual_seed(6)).bfloat16()
    params = [SamplingParams(temperature=0, logprobs=3)] * 3 + [SamplingParams(seed=2, logprobs=3)] * 3
    result = Sampler().sample(logits, params, [None] * 3 + [make_generator(2, CPU)] * 3)
    assert result.token_ids[:3] == logits.float().argmax(dim=-1)[:3].tolist()
    assert all(0 <= t < 128 for t in result.token_ids)
    ref = logits.float().log_softmax(dim=-1)
    for row, lp in enumerate(result.logprobs):
        assert lp is not None
        assert math.isclose(lp.logprob, float(ref[row, lp.token_id]), abs_tol=1e-5)


def test_banned_ids_never_sampled() -> None:
    n = 200
    logits = torch.zeros(n, 10)
    logits[:, 0] = 5.0  # the banned EOS would otherwise dominate
    banned = [(0, 1, 2)] * n
    ids = _sample(logits, [SamplingParams()] * n, list(range(n)), banned=banned)
    assert not set(ids) & {0, 1, 2}
    greedy = _sample(logits[:2], [SamplingParams(temperature=0)] * 2, [None, None],
                     banned=[(0,), (99,)])  # out-of-vocab ids are ignored
    assert greedy == [1, 0]


def test_logits_untouched_and_lengths_checked() -> None:
    logits = torch.randn(2, 20, generator=torch.Generator().manual_seed(7))
    copy = logits.clone()
    Sampler().sample(logits, [SamplingParams(top_p=0.5)] * 2, [None, None], banned=[(1,), (2,)])
    assert torch.equal(logits, copy)
    with pytest.raises(ValueError):
        Sampler().sample(logits, [SamplingParams()], [None, None])


def test_make_generator() -> None:
    assert make_generator(None, CPU) is None
    a, b = make_generator(11, CPU), make_generator(11, "cpu")
    assert a is not None and b is not None
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))
