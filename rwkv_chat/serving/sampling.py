"""Next-token sampling with ChatRWKV ``PIPELINE`` semantics, one row at a time or for a whole batch.

Promises:
- ``sample_token`` draws one token id from a 1-D logits tensor the way ChatRWKV does:
  ``probs = softmax(logits)``; keep the smallest head of the sorted distribution whose cumulative mass
  reaches ``top_p`` (every token at least as likely as the last one kept survives); optionally keep only
  the ``top_k`` most likely of those; then reweight the kept tokens by ``probs ** (1 / temperature)``.
  Temperature therefore never changes *which* tokens are kept, only their relative weights.
  ``temperature == 0`` is greedy (argmax). "Sorted" means by probability, most likely first, equal
  probabilities in increasing id order (stable sorts), so ties are broken the same way everywhere.
- ``sample_batch`` does the same for B rows of logits [B, V] at once, each row with its own ``Sampler``
  (params, penalties, generator, banned ids), and returns for every row the token ``sample_token`` returns
  for that row: bit for bit on the CPU (tested), and on accelerators up to the last-bit rounding of their
  reduction kernels, whose order of operations may depend on the shapes, and of their exp (which decides
  whether two logits one ulp apart get the same probability; exact ties are equal everywhere). There
  ``Sampler.sample`` uses the batched path for one row too. Off the CPU it is a fixed number of device
  kernels, one host-to-device copy and one host sync (the final ``.tolist()``) whatever B is; where Triton
  runs (CUDA) the draw itself is one fused kernel that sorts nothing (kernels/sampling_triton.py), elsewhere
  a stable sort of every row; on the CPU it runs ``sample_token`` row by row, which avoids sorting whole
  vocabularies (milliseconds each there). ``sample_token`` does its work on the host in numpy (PyTorch
  only for its softmaxes, whose bits must be the batched kernels'): ~0.15 ms a row of 65,536 at the chat
  defaults on a 2-core CPU, where PyTorch's per-call costs made it ~0.45.
- ``SamplingRows`` keeps a batch's sampling on the device across steps (parameters, dense penalty counts,
  banned ids, uniforms drawn ahead), so a step's draw and its penalty update are a fixed set of kernels
  (one CUDA graph replay on CUDA, the draw the fused kernel with penalties and bans in it) with no host sync
  and no per-row host work; rows change only when chats join or leave. It draws what
  ``sample_token`` draws (tested against it over many steps, rows joining and leaving).
- Repetition penalties (``PenaltyState``) follow ChatRWKV's chat loop: before sampling,
  ``logit[t] -= presence + count[t] * frequency`` for every token sampled so far; after each sampled
  token every count decays (``count *= decay``) and the new token's count grows by 1, or by 0 for
  "exempt" tokens (ChatRWKV: a token whose text is a substring of ``" \\t0123456789"``). An exempt token
  still pays the presence penalty once it has been sampled, exactly as in ChatRWKV. ``PenaltyState``'s
  counts live on the host, sparse (``update`` is numpy work over the tokens seen, no device work);
  ``SamplingRows`` keeps the same float64 arithmetic on the device, dense.
- Randomness comes only from the CPU ``torch.Generator`` the caller passes (torch's default CPU generator
  when none is given): the same seed and the same logits give the same tokens on every device. Each
  non-greedy draw takes exactly one uniform float64 number from it (inverse CDF over the kept tokens, in
  sorted order when top_p or top_k removed any, else in id order). In ``sample_batch`` a row whose logits
  turn out invalid has still taken its number (the check needs the device's answer). ``SamplingRows``
  takes a row's numbers in blocks ahead of its draws (the i-th draw still uses the i-th number), so a
  generator may have run up to a block further when its chat ends.
- The caller's logits tensor is never modified.

Does not know: tokenizers, models, stop rules. Token 0 (end-of-text) is an ordinary token here; a caller
that must not produce it passes ``ban_tokens=(0,)``, which sets its logit to -inf before sampling.

Deliberate differences from the reference:
- ``top_p == 1`` keeps every token. (The reference CPU path compares a float32 cumulative sum against
  1.0, which usually never reaches it, and then silently falls back to greedy.) The same fallback
  (keep all) applies whenever the cumulative mass never reaches ``top_p`` through rounding.
- The temperature is applied in log space (``softmax(logits / T)`` over the kept tokens), which is the
  same distribution as ``probs ** (1/T)`` normalised but cannot underflow to all-zeros at small T.
- Greedy picks the lowest id among exactly tied maxima; the reference picks one of them at random.
- Counts are float64 on the host (the reference keeps Python floats too); penalties are applied in fp32.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from ..kernels import sampling_triton

PENALTY_EXEMPT_TEXT = " \t0123456789"  # ChatRWKV: tokens whose text is a substring of this add 0 to their count


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_penalties(presence: float, frequency: float, decay: float) -> None:
    _check(_is_real(presence) and presence >= 0, f"presence_penalty must be a finite number >= 0, got {presence!r}")
    _check(_is_real(frequency) and frequency >= 0, f"frequency_penalty must be a finite number >= 0, got {frequency!r}")
    _check(_is_real(decay) and 0 < decay <= 1, f"penalty_decay must be in (0, 1], got {decay!r}")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. Validated on construction (ValueError with the offending field)."""

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 0.3  # nucleus mass kept, in (0, 1]
    top_k: int = 0  # 0 = no top-k limit
    presence_penalty: float = 0.4
    frequency_penalty: float = 0.4
    penalty_decay: float = 0.996

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        t, p, k = self.temperature, self.top_p, self.top_k
        _check(_is_real(t) and t >= 0, f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        _check(_is_real(p) and 0 < p <= 1, f"top_p must be in (0, 1], got {p!r}")
        _check(isinstance(k, int) and not isinstance(k, bool) and k >= 0,
               f"top_k must be an integer >= 0 (0 = off), got {k!r}")
        _check_penalties(self.presence_penalty, self.frequency_penalty, self.penalty_decay)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def is_penalty_exempt(text: str) -> bool:
    """ChatRWKV's rule: a token whose decoded text is a substring of " \\t0123456789" adds 0 to its count.

    So " ", "\\t", "7", "12", " \\t" are exempt; "\\n", "  ", "2023", " 1" are not.
    """
    return text in PENALTY_EXEMPT_TEXT


def penalty_exempt_mask(token_bytes: Iterable[tuple[int, bytes]], vocab_size: int) -> torch.Tensor:
    """Bool mask [vocab_size] of penalty-exempt tokens from (id, bytes) pairs, e.g. a tokenizer's id->bytes table.

    Bytes that are not valid UTF-8 on their own are not exempt (ChatRWKV decodes them to U+FFFD).
    """
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    for token, raw in token_bytes:
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            continue
        if is_penalty_exempt(text):
            _check(0 <= token < vocab_size, f"token id {token} is outside the vocabulary (size {vocab_size})")
            mask[token] = True
    return mask


class PenaltyState:
    """Decaying per-token occurrence counts of one generated sequence, and the penalty they imply.

    Kept on the host and sparse: the counts of the tokens seen so far, in order of first sampling (float64).
    ``update`` multiplies them by the decay and adds 1 to the new token's (numpy work over the distinct
    tokens seen, no device work): ``count = count * decay + 1``, the same float64 operations, in the same
    order, as ChatRWKV's loop and as ``SamplingRows``' dense device counts, so both give the same penalties
    bit for bit. ``sparse()`` gives the nonzero penalties; ``penalty()`` / ``counts`` / ``seen`` give dense
    [V] tensors on ``device`` (for tests and callers that want them); ``apply`` returns penalised logits (a
    new fp32 tensor).
    """

    def __init__(
        self,
        vocab_size: int,
        presence: float = 0.4,
        frequency: float = 0.4,
        decay: float = 0.996,
        exempt: Optional[torch.Tensor] = None,
        device: Optional[torch.device | str] = None,
    ) -> None:
        _check(isinstance(vocab_size, int) and vocab_size > 0,
               f"vocab_size must be a positive integer, got {vocab_size!r}")
        _check_penalties(presence, frequency, decay)
        if exempt is not None:
            _check(exempt.dtype == torch.bool and tuple(exempt.shape) == (vocab_size,),
                   f"exempt must be a bool tensor of shape [{vocab_size}], got {exempt.dtype} {tuple(exempt.shape)}")
            exempt = exempt.detach().cpu()
        self.vocab_size = vocab_size
        self.presence = float(presence)
        self.frequency = float(frequency)
        self.decay = float(decay)
        self.exempt = exempt  # [V] bool on CPU, or None; never mutated, shared by clones
        self._exempt = exempt.numpy() if exempt is not None else None  # a view of it, for O(1) lookups
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._slots: dict[int, int] = {}  # token id -> its index in _ids / _counts (order of first sampling)
        self._ids = np.zeros(16, dtype=np.int64)  # [capacity] token ids seen
        self._counts = np.zeros(16, dtype=np.float64)  # [capacity] their decayed counts

    @classmethod
    def from_params(cls, params: SamplingParams, vocab_size: int, exempt: Optional[torch.Tensor] = None,
                    device: Optional[torch.device | str] = None) -> "PenaltyState":
        return cls(vocab_size, params.presence_penalty, params.frequency_penalty, params.penalty_decay, exempt, device)

    # ------------------------------------------------------------------------------------ recording
    def update(self, token: int) -> None:
        """Record one sampled token: decay every count, then count the token (+0 if exempt)."""
        token = int(token)
        _check(0 <= token < self.vocab_size, f"token id {token} is outside the vocabulary (size {self.vocab_size})")
        n = len(self._slots)
        if self.decay != 1.0:
            self._counts[:n] *= self.decay
        slot = self._slots.get(token)
        if slot is None:
            slot = self._add(token)
        if self._exempt is None or not self._exempt[token]:
            self._counts[slot] += 1.0

    def _add(self, token: int) -> int:
        slot = len(self._slots)
        if slot == self._ids.size:  # grow by doubling: amortised O(1)
            self._ids = np.concatenate([self._ids, np.zeros_like(self._ids)])
            self._counts = np.concatenate([self._counts, np.zeros_like(self._counts)])
        self._ids[slot] = token
        self._slots[token] = slot
        return slot

    def clone(self) -> "PenaltyState":
        other = object.__new__(PenaltyState)
        other.__dict__.update(self.__dict__)
        other._slots = dict(self._slots)
        other._ids = self._ids.copy()
        other._counts = self._counts.copy()
        return other

    # ------------------------------------------------------------------------------------ reading
    def _seen_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [n], counts float64 [n]) of every token sampled so far (views of internal storage)."""
        n = len(self._slots)
        return self._ids[:n], self._counts[:n]

    def _sparse_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [n], amounts fp32 [n]) of the nonzero penalties; ids may be views of internal storage."""
        ids, counts = self._seen_arrays()
        amounts = self.presence + counts * self.frequency  # [n] float64
        if self.presence == 0.0:
            keep = amounts != 0.0
            ids, amounts = ids[keep], amounts[keep]
        return ids, amounts.astype(np.float32)

    def sparse(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The nonzero penalties as (token ids int64 [n], amounts fp32 [n]), on the CPU, in no set order."""
        ids, amounts = self._sparse_arrays()
        return torch.from_numpy(ids.copy()), torch.from_numpy(amounts)

    def _dense(self, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """[V] on ``device``: ``values`` at ``ids``, zero (False) elsewhere."""
        return torch.zeros(self.vocab_size, dtype=values.dtype).index_put_((ids,), values).to(self.device)

    def penalty(self) -> torch.Tensor:
        """The amount subtracted from each logit: [V] fp32, zero for tokens never sampled."""
        return self._dense(*self.sparse())

    @property
    def counts(self) -> torch.Tensor:
        """The decayed counts: [V] fp32 on ``device``."""
        ids, counts = self._seen_arrays()
        return self._dense(torch.from_numpy(ids.copy()), torch.from_numpy(counts.astype(np.float32)))

    @property
    def seen(self) -> torch.Tensor:
        """Which tokens were sampled at least once: [V] bool on ``device``."""
        ids = torch.from_numpy(self._seen_arrays()[0].copy())
        return self._dense(ids, torch.ones(ids.numel(), dtype=torch.bool))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Penalised copy of ``logits`` (last dim = vocab) as fp32; the input is left untouched."""
        _check(logits.shape[-1] == self.vocab_size,
               f"logits have {logits.shape[-1]} entries in the last dim, penalties expect {self.vocab_size}")
        return logits.float() - self.penalty().to(logits.device)


class Sampler:
    """Everything one chat needs to pick its next token: params, its penalties (read here; the caller
    updates them with each accepted token), its CPU generator (None = torch's default CPU generator) and
    the ids it must never produce. One row of ``sample_batch``."""

    __slots__ = ("params", "generator", "penalties", "ban_tokens", "_bans", "_ban_range")

    def __init__(self, params: SamplingParams, generator: Optional[torch.Generator] = None,
                 penalties: Optional[PenaltyState] = None, ban_tokens: Iterable[int] = ()) -> None:
        _check(isinstance(params, SamplingParams), f"params must be SamplingParams, got {type(params).__name__}")
        _check_generator(generator)
        self.params = params
        self.generator = generator
        self.penalties = penalties
        self.ban_tokens = tuple(int(t) for t in ban_tokens)
        self._bans = np.asarray(self.ban_tokens, dtype=np.int64)  # [m], for building batch indices
        self._ban_range = (min(self.ban_tokens), max(self.ban_tokens)) if self.ban_tokens else (0, 0)

    def sample(self, logits: torch.Tensor) -> int:
        """Next token from 1-D ``logits`` [V]: ``sample_token`` on the CPU, the batched path elsewhere
        (one host sync instead of several); the same draw either way (see the module docstring)."""
        if logits.device.type == "cpu":
            return sample_token(logits, self.params, self.generator, self.penalties, self.ban_tokens)
        _check(logits.dim() == 1, f"logits must be 1-D [vocab], got shape {tuple(logits.shape)}")
        return sample_batch(logits.unsqueeze(0), [self])[0]


def _check_generator(generator: Optional[torch.Generator]) -> None:
    _check(generator is None or (isinstance(generator, torch.Generator) and generator.device.type == "cpu"),
           f"generator must be a CPU torch.Generator or None (the uniforms are drawn on the CPU), got {generator!r}")


def _uniform(generator: Optional[torch.Generator]) -> float:
    """One uniform float64 number in [0, 1) from ``generator`` (None: torch's default CPU generator)."""
    return float(torch.rand(1, generator=generator, dtype=torch.float64))


_SCAN_BLOCK = 256  # _prefix_sums works in blocks of this many entries


def _prefix_sums(values: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Inclusive prefix sums along the last dim, built in blocks of _SCAN_BLOCK: each block's own running
    sum plus the (running) sum of the blocks before it.

    Both samplers use this fixed structure, so a prefix sum depends only on the entries up to it, never
    on the row's length or on the other rows: on the CPU (where each scan is sequential) sample_token's
    sums over a few candidates equal sample_batch's sums over whole rows bit for bit. It is also much
    faster on GPUs than one scan along a long row (which they do largely sequentially)."""
    *lead, n = values.shape
    pad = -n % _SCAN_BLOCK
    if pad:
        values = torch.nn.functional.pad(values, (0, pad))
    within = torch.cumsum(values.reshape(*lead, -1, _SCAN_BLOCK), dim=-1, dtype=dtype)  # [..., n_blocks, C]
    totals = torch.cumsum(within[..., -1], dim=-1)  # [..., n_blocks] sums of the blocks up to each
    before = torch.nn.functional.pad(totals[..., :-1], (1, 0))  # [..., n_blocks] sums of the blocks before
    sums = (within + before.unsqueeze(-1)).reshape(*lead, -1)
    return sums[..., :n].contiguous() if pad else sums


# ---------------------------------------------------------------------------------------- one row
# sample_token works on the host, in numpy: on a 2-core CPU each PyTorch call on a 65,536-entry row or a
# handful of candidates costs 5-15 us of dispatch alone, a numpy call 1-4. Only the two softmaxes are
# PyTorch's, so that their bits are the ones sample_batch's kernels give. numpy's cumsum with
# dtype=float64, rounded to the output dtype, is PyTorch's CPU cumsum (which accumulates in float64); the
# comparisons are in fp32 both ways.
#
# Sorting the whole vocabulary is slow on a CPU (65536 floats: milliseconds), so the nucleus is searched
# among the tokens within these ratios of the top probability first, widening only when their mass is short.
# The candidates come in increasing id order and are sorted stably, so their order (and their cumulative
# sums, see _prefix_sums) is the head of the full sort that sample_batch uses.
_CANDIDATE_RATIOS = (1e-2, 1e-4, 0.0)

# PyTorch's CPU softmax sums a row in vectors of 8 or 16 lanes (one accumulator, then across its lanes), so a
# row of kept values followed by -inf (exp: 0) gives the same bits over its first whole multiple of 16 entries
# as over the whole vocabulary: sample_token softmaxes that width, sample_batch full rows
# (tests/serving/test_sampling.py holds the two equal).
_SOFTMAX_WIDTH = 16


_TORCH_DTYPES = {np.float32: torch.float32, np.float64: torch.float64}


def _host_prefix_sums(values: np.ndarray, dtype: type) -> np.ndarray:
    """_prefix_sums of a 1-D host array of non-negative numbers, bit for bit. [n] ``dtype``"""
    if values.size <= _SCAN_BLOCK:  # one block: the padded form adds 0 to each sum, which changes no sum >= 0
        return np.cumsum(values, dtype=np.float64).astype(dtype, copy=False)
    return _prefix_sums(torch.from_numpy(values), _TORCH_DTYPES[dtype]).numpy()


def _candidates(probs: np.ndarray, top: np.float32, ratio: float) -> np.ndarray:
    """Ids whose probability is at least ``ratio`` times the top one (an fp32 product), ascending. [m]"""
    return np.flatnonzero(probs >= top * np.float32(ratio))


def _sorted(probs: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``ids`` ordered by probability, most likely first, ties by id (a stable sort), and their probs."""
    values = probs[ids]
    order = np.argsort(-values, kind="stable")
    return ids[order], values[order]


def _nucleus(probs: np.ndarray, top_p: float) -> Optional[np.ndarray]:
    """Ids of the tokens kept by top_p in sorted order, or None for "every token" (never reached). [n]

    Kept: every token at least as likely as the one at which the sorted cumulative mass first reaches
    top_p. The candidates are the head of the full sorted order, so their cumulative sums are the same.
    """
    top, limit = probs.max(), np.float32(top_p)
    for ratio in _CANDIDATE_RATIOS:
        ids, sorted_probs = _sorted(probs, _candidates(probs, top, ratio))  # [m]
        cumulative = _host_prefix_sums(sorted_probs, np.float32)  # [m]
        if cumulative[-1] >= limit:
            cutoff = sorted_probs[np.count_nonzero(cumulative < limit)]
            return ids[: np.count_nonzero(sorted_probs >= cutoff)]
    return None  # rounding kept the total mass below top_p: keep everything


def _head(probs: np.ndarray, k: int) -> np.ndarray:
    """The k most likely ids in sorted order (ties by id, as a stable sort of the whole row gives). [k]"""
    k, top = min(k, probs.size), probs.max()
    for ratio in _CANDIDATE_RATIOS:  # the k-th largest value is among the candidates once there are k
        ids = _candidates(probs, top, ratio)
        if ids.size >= k:
            return _sorted(probs, ids)[0][:k]
    raise AssertionError("unreachable: ratio 0 keeps every id")


def _kept_tokens(probs: np.ndarray, params: SamplingParams) -> Optional[np.ndarray]:
    """Ids surviving top_p then top_k, in sorted order, or None for every token (drawn in id order)."""
    ids = _nucleus(probs, params.top_p) if params.top_p < 1.0 else None
    if params.top_k <= 0:
        return ids
    return _head(probs, params.top_k) if ids is None else ids[: params.top_k]


def _softmax(values: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(values), dim=0).numpy()


def _prepare_logits(logits: torch.Tensor, penalties: Optional[PenaltyState], ban_tokens: Iterable[int]) -> np.ndarray:
    """The logits as a new fp32 host array, penalised and with the banned ids at -inf. [V]"""
    _check(logits.dim() == 1, f"logits must be 1-D [vocab], got shape {tuple(logits.shape)}")
    vocab = logits.shape[0]
    out = logits.detach().to("cpu", torch.float32, copy=True).numpy()
    if penalties is not None:
        _check(penalties.vocab_size == vocab, f"logits have {vocab} entries, penalties expect {penalties.vocab_size}")
        ids, amounts = penalties._sparse_arrays()  # distinct ids
        if ids.size:  # x - a: the fp32 operation sample_batch's scatter of -a does
            out[ids] -= amounts
    banned = [int(t) for t in ban_tokens]
    if banned:
        _check(0 <= min(banned) and max(banned) < vocab, f"ban token ids must be in [0, {vocab}), got {banned}")
        out[banned] = -np.inf
    top = float(out.max())  # NaN if any NaN, +inf if any +inf, -inf if every token is banned
    _check(math.isfinite(top), "logits must have no NaN or +inf and at least one finite entry (not all banned)")
    return out


def _weights(logits: np.ndarray, ids: Optional[np.ndarray], temperature: float) -> np.ndarray:
    """probs ** (1/T) renormalised over the kept ids, in draw order: softmax(logits / T) over the whole row
    in id order when every token is kept, else over a row holding the kept ids' logits / T in their sorted
    order first and -inf after them, _SOFTMAX_WIDTH-aligned. [V], or [W >= len(ids)]"""
    scale = np.float32(temperature)
    if ids is None:
        return _softmax(logits / scale)
    scaled = np.full(min(logits.size, -(-ids.size // _SOFTMAX_WIDTH) * _SOFTMAX_WIDTH), -np.inf, np.float32)
    scaled[: ids.size] = logits[ids] / scale
    return _softmax(scaled)


def _pick(weights: np.ndarray, u: float) -> int:
    """Index drawn with probability proportional to ``weights`` [n] by inverse CDF on the uniform ``u``.

    ``u * total < total`` always (u <= 1 - 2**-53 and rounding is monotone), so the index found has a
    nonzero weight and zeros after the kept tokens are never reached."""
    cdf = _host_prefix_sums(weights, np.float64)  # [n]
    return int(np.searchsorted(cdf, u * cdf[-1], side="right"))


def sampling_distribution(
    logits: torch.Tensor,
    params: SamplingParams,
    penalties: Optional[PenaltyState] = None,
    ban_tokens: Iterable[int] = (),
) -> torch.Tensor:
    """The exact [V] fp32 distribution ``sample_token`` draws from (one-hot at temperature 0), on the logits'
    device."""
    prepared = _prepare_logits(logits, penalties, ban_tokens)
    distribution = np.zeros_like(prepared)
    if params.greedy:
        distribution[prepared.argmax()] = 1.0
    else:
        ids = _kept_tokens(_softmax(prepared), params)
        weights = _weights(prepared, ids, params.temperature)
        if ids is None:
            distribution = weights
        else:
            distribution[ids] = weights[: ids.size]
    return torch.from_numpy(distribution).to(logits.device)


def sample_token(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: Optional[torch.Generator] = None,
    penalties: Optional[PenaltyState] = None,
    ban_tokens: Iterable[int] = (),
) -> int:
    """Draw the next token id from 1-D ``logits`` [vocab] (on any device; the work is done on the host).

    ``penalties`` is read, not updated: call ``penalties.update(token)`` once the token is accepted.
    Its coefficients are its own (see ``PenaltyState.from_params``); ``params`` supplies temperature,
    top_p and top_k. ``ban_tokens`` get logit -inf (e.g. ``(0,)`` to forbid end-of-text).
    The uniform number comes from ``generator`` (a CPU generator; None = torch's default CPU generator),
    so a seed gives the same tokens whatever device the logits are on (up to floating-point differences
    in the logits).
    """
    _check_generator(generator)
    prepared = _prepare_logits(logits, penalties, ban_tokens)
    if params.greedy:
        return int(prepared.argmax())  # the first (lowest id) maximum, as torch.argmax
    u = _uniform(generator)
    ids = _kept_tokens(_softmax(prepared), params)
    weights = _weights(prepared, ids, params.temperature)  # in draw order
    if ids is None:
        return _pick(weights, u)
    return int(ids[_pick(weights[: ids.size], u)])


# ---------------------------------------------------------------------------------------- a batch
def sample_batch(logits: torch.Tensor, rows: Sequence[Sampler], *, errors: str = "raise",
                 vectorised: Optional[bool] = None) -> list:
    """One token per row of ``logits`` [B, V], row b drawn with ``rows[b]`` exactly as ``sample_token``
    would draw it (see the module docstring).

    A row that cannot be sampled (NaN or +inf logits, every token banned, penalties or bans that do not
    fit V) does not disturb the others: with ``errors="raise"`` the first such row's ValueError (naming
    the row and the problem) is raised once every row is done, with ``errors="return"`` that row's entry
    is the ValueError instead of a token id. A bad shape (not [len(rows), V]) raises for the whole batch.
    ``vectorised``: None = batched kernels off the CPU, ``sample_token`` row by row on it; True / False
    force one or the other (the tests check that both agree).
    """
    rows = list(rows)
    _check(isinstance(logits, torch.Tensor) and logits.dim() == 2 and logits.shape[0] == len(rows),
           f"logits must be [rows, vocab] with one row per sampler ({len(rows)}), got "
           f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    _check(errors in ("raise", "return"), f"errors must be 'raise' or 'return', got {errors!r}")
    _check(all(isinstance(row, Sampler) for row in rows), "rows must be Sampler objects")
    if not rows:
        return []
    if vectorised is None:
        vectorised = logits.device.type != "cpu"
    with torch.no_grad():
        results = _sample_vectorised(logits, rows) if vectorised else _sample_each(logits, rows)
    if errors == "raise":
        for result in results:
            if isinstance(result, ValueError):
                raise result
    return results


def _sample_each(logits: torch.Tensor, rows: list[Sampler]) -> list:
    results: list = []
    for b, row in enumerate(rows):
        try:
            results.append(sample_token(logits[b], row.params, row.generator, row.penalties, row.ban_tokens))
        except ValueError as error:
            results.append(ValueError(f"row {b}: {error}"))
    return results


def _row_problem(row: Sampler, vocab: int) -> Optional[str]:
    if row.penalties is not None and row.penalties.vocab_size != vocab:
        return f"logits have {vocab} entries, penalties expect {row.penalties.vocab_size}"
    if row.ban_tokens and not (0 <= row._ban_range[0] and row._ban_range[1] < vocab):
        return f"ban token ids must be in [0, {vocab}), got {list(row.ban_tokens)}"
    return None


def _pack(parts: list[tuple[np.ndarray, torch.dtype]]) -> tuple[np.ndarray, list]:
    """Host arrays as one byte buffer (one copy to the device) and each one's (byte offset, shape, dtype),
    8-byte aligned, so the device reads them back as typed views with no conversion kernels."""
    chunks, layout, offset = [], [], 0
    for part, dtype in parts:
        raw = np.ascontiguousarray(part).reshape(-1).view(np.uint8)
        pad = -raw.size % 8
        chunks.append(np.concatenate([raw, np.zeros(pad, np.uint8)]) if pad else raw)
        layout.append((offset, part.shape, dtype))
        offset += raw.size + pad
    return (np.concatenate(chunks) if chunks else np.zeros(0, np.uint8)), layout


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``; on CUDA copied from pinned memory, so the copy does not wait for the work
    already queued there."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _unpack(buffer: np.ndarray, layout: list, device: torch.device) -> list[torch.Tensor]:
    """_pack's parts on ``device``, in order (one copy, ``to_device``)."""
    data = to_device(torch.from_numpy(buffer), device)
    parts = []
    for offset, shape, dtype in layout:
        count = int(np.prod(shape)) if len(shape) else 1
        parts.append(data[offset: offset + count * dtype.itemsize].view(dtype).view(shape))
    return parts


class _Inputs:
    """Everything one sample_batch call needs from the host, packed into one byte buffer (one copy to the
    device; sparse penalties and bans, no [B, V] tables). Built before any device work, so it overlaps
    whatever the device is still doing; the uniforms are drawn here."""

    def __init__(self, rows: list[Sampler], vocab: int) -> None:
        batch = len(rows)
        uniform = np.zeros(batch, np.float64)  # [B]
        top_k = np.full(batch, vocab, np.int64)  # [B] V when off
        temperature = np.ones(batch, np.float32)  # [B] 1 for greedy rows (unused)
        top_p = np.full(batch, 2.0, np.float32)  # [B] 2 = never reached (top_p 1 keeps every token)
        greedy = np.zeros(batch, np.bool_)  # [B]
        has_top_k = np.zeros(batch, np.bool_)  # [B]
        penalty_ids, amounts, bans, self.problems = [], [], [], {}
        for b, row in enumerate(rows):
            problem = _row_problem(row, vocab)
            params = row.params
            if problem is not None:  # sampled greedily and unpenalised; its result is replaced by the error
                self.problems[b] = problem
                greedy[b] = True
                continue
            if row.penalties is not None:
                ids, amount = row.penalties._sparse_arrays()
                if ids.size:
                    penalty_ids.append(ids + b * vocab)
                    amounts.append(amount)
            if row._bans.size:
                bans.append(row._bans + b * vocab)
            if params.greedy:
                greedy[b] = True
                continue
            uniform[b] = _uniform(row.generator)
            temperature[b] = params.temperature
            if params.top_p < 1.0:
                top_p[b] = params.top_p  # rounded to fp32 here, as sample_token's comparison rounds it
            if params.top_k > 0:
                top_k[b], has_top_k[b] = min(params.top_k, vocab), True
        self.any_greedy = bool(greedy.any())
        self.any_sampled = not bool(greedy.all())
        self.any_filtered = bool(((top_p <= 1.0) | has_top_k)[~greedy].any())
        penalty_ids = np.concatenate(penalty_ids) if penalty_ids else np.zeros(0, np.int64)
        negated = -np.concatenate(amounts) if amounts else np.zeros(0, np.float32)
        ban_ids = np.concatenate(bans) if bans else np.zeros(0, np.int64)
        self.n_penalties, self.n_bans = penalty_ids.size, ban_ids.size
        self.packed = _pack([(uniform, torch.float64), (top_k, torch.int64), (penalty_ids, torch.int64),
                             (ban_ids, torch.int64), (temperature, torch.float32), (top_p, torch.float32),
                             (negated, torch.float32), (greedy, torch.bool), (has_top_k, torch.bool)])


def _sample_vectorised(logits: torch.Tensor, rows: list[Sampler]) -> list:
    """sample_batch with a fixed set of batched kernels and a single host sync (the final ``.tolist()``)."""
    batch, vocab = logits.shape
    inputs = _Inputs(rows, vocab)  # host work first: it overlaps the device's queued work
    uniform, top_k, penalty_ids, ban_ids, temperature, top_p, negated, greedy, has_top_k = _unpack(
        *inputs.packed, logits.device)
    x = logits.to(torch.float32, copy=True, memory_format=torch.contiguous_format)  # [B, V]
    flat = x.view(-1)  # [B*V]
    if inputs.n_penalties:  # x + (-a) at every (row, seen token): one scatter for the whole batch
        flat.scatter_add_(0, penalty_ids, negated)
    if inputs.n_bans:
        flat.index_fill_(0, ban_ids, -math.inf)
    results = None
    if sampling_triton.usable(x.device):  # the fused draw (no sort), on the prepared logits
        cursor = torch.zeros(batch, dtype=torch.long, device=x.device)
        try:
            results = sampling_triton.draw(x, None, None, None, None, None, temperature, top_p, top_k, has_top_k,
                                           greedy, uniform.unsqueeze(1), cursor, False, False).tolist()  # one sync
        except sampling_triton.KernelFailed:  # warned once; the sorted path from now on
            pass
    if results is None:
        valid = torch.isfinite(x.amax(dim=1))  # [B] no NaN / +inf, not all banned
        if not inputs.any_sampled:
            token = x.argmax(dim=1)  # [B] the first (lowest id) maximum
        else:
            token = _draw_rows(x, uniform, temperature, top_p, top_k, has_top_k, inputs.any_filtered)
            if inputs.any_greedy:
                token = torch.where(greedy, x.argmax(dim=1), token)
        results = torch.where(valid, token, -1).tolist()  # the one host sync
    for b, problem in inputs.problems.items():
        results[b] = ValueError(f"row {b}: {problem}")
    for b, result in enumerate(results):
        if not isinstance(result, ValueError) and result < 0:
            results[b] = ValueError(f"row {b}: logits must have no NaN or +inf and at least one finite entry "
                                    "(not all banned)")
    return results


UNIFORM_BLOCK = 64  # SamplingRows draws a row's uniforms ahead in blocks of this many (refilled when used up)

_ROW_FIELDS = ("temperature", "top_p", "top_k", "has_top_k", "greedy", "presence", "frequency", "decay",
               "uniforms", "cursor", "counts", "seen", "exempt", "banned")
_HOST_FLAGS = ("_greedy", "_filtered", "_penalised", "_banning", "_drawn")


class SamplingRows:
    """The sampling of a batch whose rows change only when chats join or leave, kept on the logits' device.

    Each row is a ``Sampler``; its parameters are [rows] device tensors, its penalties dense [rows, V]
    device tensors (float64 counts, seen / exempt / banned masks), and its uniforms a block drawn ahead from
    its generator, all built when the row joins (``add`` / ``put``: one host-to-device copy).
    ``step(logits)`` (= ``draw`` then ``count``) is then a fixed set of kernels with no host sync and no
    per-row host work: ``draw`` picks every row's token, ``count`` records the tokens in the penalties
    (every count decays by one multiply, the drawn ones grow by one scatter) and moves each sampled row to
    its next uniform (a row that has used its block gets the next one from its generator: per-row host
    work once every ``block`` draws). On CUDA, ``step`` replays a CUDA graph of both (one per capacity:
    the tables are allocated for a power-of-two number of rows, so rows joining and leaving reuse it; a
    graph that cannot be captured falls back to launching the kernels). Rows never move unless asked:
    ``put`` fills given slots (or appends), ``release`` retires rows in place (they draw junk and take no
    uniforms), ``truncate`` drops the last ones.

    A row draws exactly what ``sample_token`` draws with its Sampler after the same tokens were
    ``PenaltyState.update``d (the same uniforms in the same order; the same float64 count arithmetic), up
    to the device's reduction rounding (see the module docstring). The Sampler's own PenaltyState is read
    when the row joins, never written. A greedy row takes no uniform; a sampled row takes one per draw,
    invalid logits included; a row's generator runs up to ``block`` uniforms ahead of its draws.
    """

    def __init__(self, vocab: int, device: torch.device | str, block: int = UNIFORM_BLOCK,
                 graphs: Optional[bool] = None) -> None:
        _check(block >= 1, f"block must be at least 1, got {block}")
        self.vocab, self.device, self.block = vocab, torch.device(device), block
        self.graphs = self.device.type == "cuda" if graphs is None else bool(graphs)
        self.samplers: list[Optional[Sampler]] = []  # None: a row no chat holds (released)
        self._store: dict[str, torch.Tensor] = {}  # _ROW_FIELDS -> device tensors of `capacity` rows
        self.capacity = 0
        self._greedy = np.zeros(0, np.bool_)  # [rows] host copies of what decides which kernels run
        self._filtered = np.zeros(0, np.bool_)  # [rows] top_p < 1 or top_k set (and not greedy)
        self._penalised = np.zeros(0, np.bool_)  # [rows] nonzero presence or frequency
        self._banning = np.zeros(0, np.bool_)  # [rows] some banned ids
        self._drawn = np.zeros(0, np.int64)  # [rows] uniforms used from the current block
        self._captured: dict[int, tuple] = {}  # capacity -> (graph, static logits, static tokens)
        self._pool = None

    def __len__(self) -> int:
        return len(self.samplers)

    @property
    def _rows(self) -> dict[str, torch.Tensor]:
        """The rows in use (views of the tables)."""
        size = len(self)
        return {name: tensor[:size] for name, tensor in self._store.items()}

    # ------------------------------------------------------------------------------------ membership
    def add(self, samplers: Sequence[Sampler]) -> list[Optional[str]]:
        """Append a row for each sampler, in order, except those whose penalties or bans do not fit the
        vocabulary: for each sampler None (added) or the problem that kept it out."""
        problems = self.problems(samplers)
        joining = [row for row, problem in zip(samplers, problems) if problem is None]
        if joining:
            self.put(range(len(self), len(self) + len(joining)), joining)
        return problems

    def problems(self, samplers: Sequence[Sampler]) -> list[Optional[str]]:
        """For each sampler None, or why it cannot be a row here (penalties or bans that do not fit V)."""
        return [_row_problem(row, self.vocab) for row in samplers]

    def put(self, slots: Sequence[int], samplers: Sequence[Sampler]) -> None:
        """Make ``samplers[i]`` the row at ``slots[i]``, in place (no other row moves); slots past the last
        row add rows (any between stay released). Samplers must fit (``problems``)."""
        slots = [int(slot) for slot in slots]
        _check(len(slots) == len(samplers) and len(set(slots)) == len(slots) and min(slots, default=0) >= 0,
               "put needs one distinct slot per sampler")
        if not slots:
            return
        size = max(len(self), max(slots) + 1)
        if size > self.capacity:
            self._reserve(_bucket(size))
        grow = size - len(self)
        if grow:
            self.samplers += [None] * grow
            released = {"_greedy": True, "_filtered": False, "_penalised": False, "_banning": False, "_drawn": 0}
            for name in _HOST_FLAGS:
                values = getattr(self, name)
                setattr(self, name, np.concatenate([values, np.full(grow, released[name], values.dtype)]))
        fresh, host = self._build(list(samplers))
        where = to_device(torch.tensor(slots, dtype=torch.long), self.device)
        for name in _ROW_FIELDS:
            self._store[name].index_copy_(0, where, fresh[name])
        for name, values in host.items():
            getattr(self, name)[slots] = values
        for slot, sampler in zip(slots, samplers):
            self.samplers[slot] = sampler

    def release(self, slots: Sequence[int]) -> None:
        """Retire the rows at ``slots`` without moving any row: they draw as greedy, unpenalised rows (their
        tokens are junk to be ignored) and never take another uniform, until ``put`` reuses them."""
        slots = list(slots)
        if not slots:
            return
        index = to_device(torch.tensor(slots, dtype=torch.long), self.device)
        self._store["greedy"].index_fill_(0, index, True)
        for name, value in (("_greedy", True), ("_filtered", False), ("_penalised", False), ("_banning", False),
                            ("_drawn", 0)):
            getattr(self, name)[slots] = value
        for slot in slots:
            self.samplers[slot] = None

    def truncate(self, size: int) -> None:
        """Keep only the first ``size`` rows (the others are released; the tables shrink, copying the rows
        kept, only once they are four times larger than needed)."""
        if size >= len(self):
            return
        self._store["greedy"][size:len(self)].fill_(True)
        self.samplers = self.samplers[:size]
        for name in _HOST_FLAGS:
            setattr(self, name, getattr(self, name)[:size])
        if self.capacity > 1 and 4 * size <= self.capacity:
            self._reserve(_bucket(size))

    def _reserve(self, capacity: int) -> None:
        """New tables of `capacity` rows (released ones past the rows in use), the rows in use copied over."""
        keep = min(len(self), capacity)
        store = self._blank(capacity)
        for name, tensor in self._store.items():
            store[name][:keep].copy_(tensor[:keep])
        self._store, self.capacity = store, capacity
        self._captured.clear()  # the graphs read the old tables

    def _blank(self, rows: int) -> dict[str, torch.Tensor]:
        """Tables of `rows` released rows (greedy, unpenalised, nothing banned)."""
        device, vocab = self.device, self.vocab

        def full(value, dtype, *shape):
            return torch.full((rows,) + shape, value, dtype=dtype, device=device)
        return {"temperature": full(1.0, torch.float32), "top_p": full(2.0, torch.float32),
                "top_k": full(vocab, torch.int64), "has_top_k": full(False, torch.bool),
                "greedy": full(True, torch.bool), "presence": full(0.0, torch.float64),
                "frequency": full(0.0, torch.float64), "decay": full(1.0, torch.float64),
                "uniforms": full(0.0, torch.float64, self.block), "cursor": full(0, torch.int64),
                "counts": full(0.0, torch.float64, vocab), "seen": full(False, torch.bool, vocab),
                "exempt": full(False, torch.bool, vocab), "banned": full(False, torch.bool, vocab)}

    def _build(self, rows: list[Sampler]) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
        """The device rows and the host flags of ``rows`` (one host-to-device copy)."""
        batch, vocab, block = len(rows), self.vocab, self.block
        temperature = np.ones(batch, np.float32)  # 1 for greedy rows (unused)
        top_p = np.full(batch, 2.0, np.float32)  # 2 = never reached (top_p 1 keeps every token)
        top_k = np.full(batch, vocab, np.int64)  # V when off
        has_top_k, greedy = np.zeros(batch, np.bool_), np.zeros(batch, np.bool_)
        presence, frequency, decay = np.zeros(batch), np.zeros(batch), np.ones(batch)  # float64
        uniforms = np.zeros((batch, block), np.float64)
        count_ids, counts, exempt_ids, ban_ids = [], [], [], []  # flat indices into [batch * V]
        for b, row in enumerate(rows):
            params = row.params
            greedy[b] = params.greedy
            if not params.greedy:
                uniforms[b] = _uniforms(row.generator, block)
                temperature[b] = params.temperature
                if params.top_p < 1.0:
                    top_p[b] = params.top_p  # rounded to fp32 here, as sample_token's comparison rounds it
                if params.top_k > 0:
                    top_k[b], has_top_k[b] = min(params.top_k, vocab), True
            penalties = row.penalties
            if penalties is not None:
                presence[b], frequency[b], decay[b] = penalties.presence, penalties.frequency, penalties.decay
                ids, values = penalties._seen_arrays()
                count_ids.append(ids + b * vocab)
                counts.append(values)
                if penalties._exempt is not None:
                    exempt_ids.append(np.flatnonzero(penalties._exempt) + b * vocab)
            if row._bans.size:
                ban_ids.append(row._bans + b * vocab)
        flat = [np.concatenate(parts) if parts else np.zeros(0, dtype)
                for parts, dtype in ((count_ids, np.int64), (counts, np.float64), (exempt_ids, np.int64),
                                     (ban_ids, np.int64))]
        buffer, layout = _pack([(temperature, torch.float32), (top_p, torch.float32), (top_k, torch.int64),
                                (has_top_k, torch.bool), (greedy, torch.bool), (presence, torch.float64),
                                (frequency, torch.float64), (decay, torch.float64), (uniforms, torch.float64),
                                (flat[0], torch.int64), (flat[1], torch.float64), (flat[2], torch.int64),
                                (flat[3], torch.int64)])
        (temperature_d, top_p_d, top_k_d, has_top_k_d, greedy_d, presence_d, frequency_d, decay_d, uniforms_d,
         count_ids_d, counts_d, exempt_ids_d, ban_ids_d) = _unpack(buffer, layout, self.device)

        def dense(ids, values, dtype):  # [batch, V]: values at the flat ids, zero / False elsewhere
            out = torch.zeros(batch * vocab, dtype=dtype, device=self.device)
            if ids.numel():
                out.index_put_((ids,), values if values is not None else torch.ones_like(ids, dtype=dtype))
            return out.view(batch, vocab)
        fresh = {"temperature": temperature_d, "top_p": top_p_d, "top_k": top_k_d, "has_top_k": has_top_k_d,
                 "greedy": greedy_d, "presence": presence_d, "frequency": frequency_d, "decay": decay_d,
                 "uniforms": uniforms_d, "cursor": torch.zeros(batch, dtype=torch.long, device=self.device),
                 "counts": dense(count_ids_d, counts_d, torch.float64),
                 "seen": dense(count_ids_d, None, torch.bool), "exempt": dense(exempt_ids_d, None, torch.bool),
                 "banned": dense(ban_ids_d, None, torch.bool)}
        host = {"_greedy": greedy, "_filtered": ~greedy & ((top_p <= 1.0) | has_top_k),
                "_penalised": (presence != 0) | (frequency != 0),
                "_banning": np.array([row._bans.size > 0 for row in rows], np.bool_),
                "_drawn": np.zeros(batch, np.int64)}
        return fresh, host

    # ------------------------------------------------------------------------------------ steps
    def step(self, logits: torch.Tensor) -> torch.Tensor:
        """``draw`` then ``count``: the next token of every row ([rows] long on the device, -1 where a row
        cannot be sampled), already counted. On CUDA one graph replay (see the class docstring)."""
        self._check_logits(logits)
        if self.graphs and len(self):
            captured = self._graph()
            if captured is not None:
                graph, static_logits, static_tokens = captured
                static_logits[:len(self)].copy_(logits)
                graph.replay()
                self._advance()
                return static_tokens[:len(self)]
        tokens = self.draw(logits)
        self.count(tokens)
        return tokens

    def draw(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token of every row from ``logits`` [rows, V] (left untouched): [rows] long on the
        device, -1 where the row's logits cannot be sampled (NaN or +inf, every token banned). No host sync."""
        self._check_logits(logits)
        return self._draw(logits, self._rows, self._penalised.any(), self._banning.any(), self._greedy.all(),
                          self._greedy.any(), self._filtered.any())

    def count(self, tokens: torch.Tensor) -> None:
        """Record ``tokens`` [rows] (draw's answer, on the device) as every row's latest: penalties decay and
        count them, sampled rows move to their next uniform. No host sync."""
        self._count(tokens, self._rows, self._penalised.any())
        self._advance()

    def _check_logits(self, logits: torch.Tensor) -> None:
        _check(logits.dim() == 2 and tuple(logits.shape) == (len(self), self.vocab),
               f"logits must be [{len(self)}, {self.vocab}], got {tuple(logits.shape)}")

    @staticmethod
    def _draw(logits, rows, penalised, banning, all_greedy, any_greedy, filtered) -> torch.Tensor:
        """draw over the tables `rows`; the flags leave out work no row needs (all True is always right).
        Where Triton runs (CUDA), one fused program per row (kernels/sampling_triton.py: no sort)."""
        if sampling_triton.usable(logits.device):
            try:
                return sampling_triton.draw(logits, rows["counts"], rows["seen"], rows["banned"], rows["presence"],
                                            rows["frequency"], rows["temperature"], rows["top_p"], rows["top_k"],
                                            rows["has_top_k"], rows["greedy"], rows["uniforms"], rows["cursor"],
                                            bool(penalised), bool(banning))
            except sampling_triton.KernelFailed:  # warned once; the sorted path below from now on
                pass
        x = logits.to(torch.float32, copy=True, memory_format=torch.contiguous_format)  # [B, V]
        if penalised:  # x + (-a) at every seen token, a = presence + count * frequency in float64
            amount = torch.where(rows["seen"], rows["counts"] * rows["frequency"].unsqueeze(1)
                                 + rows["presence"].unsqueeze(1), 0.0)  # [B, V] float64
            x.sub_(amount.to(torch.float32))
        if banning:
            x.masked_fill_(rows["banned"], -math.inf)
        valid = torch.isfinite(x.amax(dim=1))  # [B] no NaN / +inf, not all banned
        if all_greedy:
            token = x.argmax(dim=1)  # [B] the first (lowest id) maximum
        else:
            uniform = rows["uniforms"].gather(1, rows["cursor"].unsqueeze(1)).squeeze(1)  # [B]
            token = _draw_rows(x, uniform, rows["temperature"], rows["top_p"], rows["top_k"], rows["has_top_k"],
                               bool(filtered))
            if any_greedy:
                token = torch.where(rows["greedy"], x.argmax(dim=1), token)
        return torch.where(valid, token, -1)

    @staticmethod
    def _count(tokens, rows, penalised) -> None:
        if penalised:
            drawn = tokens.clamp(min=0).unsqueeze(1)  # [B, 1] (an invalid row's count is never read again)
            rows["counts"].mul_(rows["decay"].unsqueeze(1))
            rows["counts"].scatter_add_(1, drawn, (~rows["exempt"].gather(1, drawn)).to(torch.float64))
            rows["seen"].scatter_(1, drawn, True)
        rows["cursor"].add_((~rows["greedy"]).long())

    def _advance(self) -> None:
        """The host's side of a count: each sampled row used one more uniform; new blocks where used up."""
        self._drawn += ~self._greedy
        used = np.flatnonzero(self._drawn >= self.block)
        if used.size:  # the next block of each row that has used its own
            fresh = np.stack([_uniforms(self.samplers[i].generator, self.block) for i in used])
            index, values = _unpack(*_pack([(used, torch.int64), (fresh, torch.float64)]), self.device)
            self._store["uniforms"].index_copy_(0, index, values)
            self._store["cursor"].index_fill_(0, index, 0)
            self._drawn[used] = 0

    def _graph(self) -> Optional[tuple]:
        """(graph, static logits, static tokens) of draw + count over every row of the tables, all work in
        (so one graph serves any mix of rows); captured on first use of a capacity. None (and no more
        tries) if capturing fails: the kernels are then launched one by one."""
        captured = self._captured.get(self.capacity)
        if captured is not None:
            return captured
        try:
            rows, device = self._store, self.device
            static_logits = torch.zeros(self.capacity, self.vocab, dtype=torch.float32, device=device)
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # settle lazy initialisation; the draw alone changes no table
                self._draw(static_logits, rows, True, True, False, True, True)
            torch.cuda.current_stream(device).wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                static_tokens = self._draw(static_logits, rows, True, True, False, True, True)
                self._count(static_tokens, rows, True)
        except Exception as error:  # pragma: no cover - depends on the device and the torch build
            warnings.warn(f"sampling: no CUDA graph ({type(error).__name__}: {error}); launching kernels instead")
            self.graphs = False
            return None
        captured = self._captured[self.capacity] = (graph, static_logits, static_tokens)
        return captured


def _bucket(rows: int) -> int:
    """The power of two at least `rows` (the tables' capacity)."""
    return 1 << max(0, rows - 1).bit_length()


def _uniforms(generator: Optional[torch.Generator], count: int) -> np.ndarray:
    """The next ``count`` uniforms of ``generator``: the numbers ``count`` calls of ``_uniform`` give."""
    return torch.rand(count, generator=generator, dtype=torch.float64).numpy()


def _draw_rows(x, uniform, temperature, top_p, top_k, has_top_k, filtered: bool) -> torch.Tensor:
    """The sampled token of every row of prepared logits ``x`` [B, V] (greedy rows get junk). [B] long

    The per-row arguments are [B] tensors: uniform f64, temperature / top_p fp32 (top_p 2 = off), top_k
    long (V = off), has_top_k bool. The arithmetic is sample_token's, row by row, at full width."""
    batch, vocab = x.shape
    temperature, uniform = temperature.unsqueeze(1), uniform.unsqueeze(1)  # [B, 1]
    if filtered:
        probs = torch.softmax(x, dim=1)  # [B, V]
        sorted_probs, order = torch.sort(probs, dim=1, descending=True, stable=True)  # [B, V] ties by id
        cumulative = _prefix_sums(sorted_probs)  # [B, V]
        top_p = top_p.unsqueeze(1)  # [B, 1] compared in fp32, like sample_token
        reached = cumulative[:, -1:] >= top_p  # [B, 1] top_p applies (never for the off value 2)
        below = (cumulative < top_p).sum(dim=1, keepdim=True).clamp_(max=vocab - 1)  # [B, 1]
        cutoff = sorted_probs.gather(1, below)  # [B, 1]
        kept = torch.where(reached, (sorted_probs >= cutoff).sum(dim=1, keepdim=True), vocab)  # [B, 1]
        kept = torch.minimum(kept, top_k.unsqueeze(1))  # [B, 1]
        in_sorted = reached | has_top_k.unsqueeze(1)  # [B, 1] draw over the kept tokens in sorted order
        source = torch.where(in_sorted, x.gather(1, order), x)  # [B, V] draw order
        positions = torch.arange(vocab, device=x.device).unsqueeze(0)  # [1, V]
        scaled = torch.where(positions < kept, source / temperature, -math.inf)  # [B, V]
    else:
        scaled = x / temperature  # [B, V] every row keeps every token, in id order
    weights = torch.softmax(scaled, dim=1)  # [B, V]
    cdf = _prefix_sums(weights, torch.float64)  # [B, V]
    position = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).clamp_(max=vocab - 1)  # [B, 1]
    if filtered:
        position = torch.where(in_sorted, order.gather(1, position), position)
    return position.squeeze(1)
