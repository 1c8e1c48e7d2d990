"""Next-token selection: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

Order of operations per row (as in vLLM and HF ``generate``): banned ids -> -inf, then greedy
argmax, or temperature scaling -> top-k -> top-p -> a draw. Logprobs are always those of the raw
model distribution (``log_softmax`` of the unmodified logits), as the OpenAI API reports them.

Draws use the inverse CDF with one uniform number per row, taken from that row's own generator, so
a seeded request gets the same tokens whatever else shares its batch (and whatever the vocabulary
size). Rows without a seed share the sampler's default generator. Greedy rows draw nothing.
Unfiltered rows sample in token-id order with no sort; filtered rows sample over their sorted
candidates, found with ``topk`` when every filtered row has a top_k (a full sort of a 49k vocab is
~40x slower than ``topk(50)`` on CPU) and with a full sort when some row uses top_p alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from server.sampling_params import SamplingParams


@dataclass(frozen=True)
class TokenLogprobs:
    """Logprobs at one position: the chosen token's and the ``k`` most likely, best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class SampleResult:
    """One sampled token per row; ``logprobs[i]`` is None unless row i asked for logprobs."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator on ``device`` seeded with ``seed``; None when there is no seed (use the default)."""
    if seed is None:
        return None
    return torch.Generator(device=torch.device(device)).manual_seed(seed)


def apply_banned(logits: Tensor, banned: list[tuple[int, ...]]) -> Tensor:
    """Return a copy of ``logits: [S, V]`` with ``logits[i, banned[i]] = -inf``.

    Ids outside ``[0, V)`` are ignored: a token the model cannot emit is already "banned".
    The caller must leave each row at least one finite logit.
    """
    vocab = logits.shape[-1]
    rows = [i for i, ids in enumerate(banned) for t in ids if 0 <= t < vocab]
    cols = [t for ids in banned for t in ids if 0 <= t < vocab]
    out = logits.clone()
    if rows:
        index = (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device))
        out.index_put_(index, torch.tensor(float("-inf"), device=logits.device))
    return out


def sorted_candidates(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest of each row of ``logits: [N, V]``: ``(values, ids)``, both ``[N, min(k, V)]``.

    Descending by value; equal values in ascending id order (like torch.argmax), so a row's
    candidate order does not depend on ``k``, except for ties straddling the k-th place, where
    ``topk`` may keep either (measure zero for real logits).
    """
    if k >= logits.shape[-1]:
        return logits.sort(dim=-1, descending=True, stable=True)
    values, ids = logits.topk(k, dim=-1)
    ids, by_id = ids.sort(dim=-1)
    values, by_value = values.gather(-1, by_id).sort(dim=-1, descending=True, stable=True)
    return values, ids.gather(-1, by_value)


def mask_top_k_top_p(values: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Set to -inf the sorted candidates ``values: [N, K]`` (descending) outside top-k, then top-p.

    ``top_k: [N]`` int64 (>= K = off) keeps the first k. ``top_p: [N]`` float32 (> 1 = off): of the
    top-k-renormalized distribution keep the smallest prefix whose mass is >= top_p, i.e. candidate
    j stays iff the mass strictly before it is < top_p; the first candidate always stays.
    """
    positions = torch.arange(values.shape[-1], device=values.device)
    values = values.masked_fill(positions[None, :] >= top_k[:, None], float("-inf"))
    probs = values.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    return values.masked_fill(mass_before >= top_p[:, None], float("-inf"))


def uniform_draws(generators: list[torch.Generator | None], default: torch.Generator,
                  device: torch.device) -> Tensor:
    """``u: [N]`` float64 in [0, 1): row i from ``generators[i]`` (None = ``default``).

    Exactly one number per row, so a seeded row's stream depends only on its own generator, not on
    the vocabulary, its position or its neighbours. Unseeded rows take one joint draw.
    Drawn in float32 so that ``u * total < total`` holds exactly in float64 (see ``inverse_cdf``).
    """
    u = torch.empty(len(generators), dtype=torch.float64, device=device)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        u[torch.tensor(unseeded, device=device)] = torch.rand(
            len(unseeded), generator=default, device=device).double()
    for i, g in enumerate(generators):
        if g is not None:
            u[i] = torch.rand(1, generator=g, device=device).double()[0]
    return u


def inverse_cdf(probs: Tensor, u: Tensor) -> Tensor:
    """Index ``j: [N]`` of the first column with ``cumsum(probs[i])[j] > u[i] * sum(probs[i])``.

    ``probs: [N, K]`` (any nonnegative weights), ``u: [N]`` in [0, 1). Samples exactly from
    ``probs / sum``; zero-weight columns are never chosen. The cumsum is float64 so rounding over
    a 50k-token vocabulary cannot bias the tail.
    """
    cdf = probs.double().cumsum(dim=-1)
    target = (u * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max_(probs.shape[-1] - 1)


class Sampler:
    """Picks next tokens for a batch of rows, each with its own ``SamplingParams``.

    ``seed`` seeds the default generator (one per device, created on first use) that rows without
    their own generator draw from.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._defaults: dict[torch.device, torch.Generator] = {}

    def default_generator(self, device: torch.device) -> torch.Generator:
        """The shared generator for unseeded rows on ``device``."""
        if device not in self._defaults:
            self._defaults[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._defaults[device]

    def sample(
        self, logits: Tensor, params: list[SamplingParams],
        generators: list[torch.Generator | None],
        banned: list[tuple[int, ...]] | None = None,
    ) -> SampleResult:
        """Sample one token per row of ``logits: [S, V]`` (float32 or bf16, not modified).

        ``params[i]``, ``generators[i]`` (None = default generator) and ``banned[i]`` (token ids
        set to -inf before choosing, e.g. EOS before ``min_tokens``) belong to row i.
        """
        num_rows = logits.shape[0]
        if not len(params) == len(generators) == num_rows or (banned and len(banned) != num_rows):
            raise ValueError(f"{num_rows} logit rows but {len(params)} params, "
                             f"{len(generators)} generators, {len(banned or [])} banned lists")
        raw = logits.float()
        masked = apply_banned(raw, banned) if banned and any(banned) else raw
        token_ids = torch.empty(num_rows, dtype=torch.long, device=logits.device)
        greedy = [i for i, p in enumerate(params) if p.is_greedy]
        sampled = [i for i, p in enumerate(params) if not p.is_greedy]
        if greedy:
            idx = torch.tensor(greedy, device=logits.device)
            token_ids[idx] = masked[idx].argmax(dim=-1)
        if sampled:
            idx = torch.tensor(sampled, device=logits.device)
            token_ids[idx] = self._draw(masked[idx], [params[i] for i in sampled],
                                        [generators[i] for i in sampled])
        ids = token_ids.tolist()
        return SampleResult(token_ids=ids, logprobs=_logprobs(raw, ids, params))

    def _draw(self, logits: Tensor, params: list[SamplingParams],
              generators: list[torch.Generator | None]) -> Tensor:
        """Token ids ``[N]``: temperature, then top-k/top-p, then one draw per row of ``logits: [N, V]``."""
        device = logits.device
        temps = torch.tensor([p.temperature for p in params], device=device)
        x = logits / temps[:, None]
        u = uniform_draws(generators, self.default_generator(device), device)
        out = torch.empty(len(params), dtype=torch.long, device=device)
        plain = [i for i, p in enumerate(params) if not _has_filter(p)]
        filtered = [i for i, p in enumerate(params) if _has_filter(p)]
        if plain:
            idx = torch.tensor(plain, device=device)
            out[idx] = inverse_cdf(x[idx].softmax(dim=-1), u[idx])
        if filtered:
            idx = torch.tensor(filtered, device=device)
            out[idx] = _draw_filtered(x[idx], [params[i] for i in filtered], u[idx])
        return out


def _has_filter(p: SamplingParams) -> bool:
    return p.top_k > 0 or p.top_p < 1.0


def _draw_filtered(x: Tensor, params: list[SamplingParams], u: Tensor) -> Tensor:
    """Token ids ``[N]`` drawn from ``x: [N, V]`` (temperature-scaled) restricted by top-k/top-p."""
    vocab, device = x.shape[-1], x.device
    # Off is k = V and p = 2; p = 1 could drop tail tokens when the float cumsum rounds to 1.
    ks = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]  # top_k may exceed int64
    values, ids = sorted_candidates(x, max(ks))
    top_k = torch.tensor(ks, device=device)
    top_p = torch.tensor([p.top_p if p.top_p < 1.0 else 2.0 for p in params], device=device)
    values = mask_top_k_top_p(values, top_k, top_p)
    choice = inverse_cdf(values.softmax(dim=-1), u)
    return ids.gather(-1, choice[:, None]).squeeze(-1)


def _logprobs(raw: Tensor, token_ids: list[int], params: list[SamplingParams]
              ) -> list[TokenLogprobs | None]:
    """Raw-distribution logprobs for rows that asked: chosen token plus top-k (descending)."""
    out: list[TokenLogprobs | None] = [None] * len(params)
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return out
    idx = torch.tensor(rows, device=raw.device)
    lp = raw[idx].log_softmax(dim=-1)
    chosen_ids = torch.tensor([token_ids[i] for i in rows], device=raw.device)
    chosen = lp.gather(-1, chosen_ids[:, None]).squeeze(-1).tolist()
    max_k = min(max(params[i].logprobs or 0 for i in rows), raw.shape[-1])
    top_vals, top_ids = lp.topk(max_k, dim=-1) if max_k else (lp[:, :0], lp[:, :0].long())
    top_vals_l, top_ids_l = top_vals.tolist(), top_ids.tolist()
    for j, i in enumerate(rows):
        k = params[i].logprobs or 0
        top = list(zip(top_ids_l[j][:k], top_vals_l[j][:k], strict=True))
        out[i] = TokenLogprobs(token_id=token_ids[i], logprob=chosen[j], top=top)
    return out
