"""Next-token sampling with ChatRWKV ``PIPELINE`` semantics.

Promises:
- ``sample_token`` draws one token id from a 1-D logits tensor the way ChatRWKV does:
  ``probs = softmax(logits)``; keep the smallest head of the sorted distribution whose cumulative mass
  reaches ``top_p`` (every token at least as likely as the last one kept survives); optionally keep only
  the ``top_k`` most likely of those; then reweight the kept tokens by ``probs ** (1 / temperature)``.
  Temperature therefore never changes *which* tokens are kept, only their relative weights.
  ``temperature == 0`` is greedy (argmax).
- Repetition penalties (``PenaltyState``) follow ChatRWKV's chat loop: before sampling,
  ``logit[t] -= presence + count[t] * frequency`` for every token sampled so far; after each sampled
  token every count decays (``count *= decay``) and the new token's count grows by 1, or by 0 for
  "exempt" tokens (ChatRWKV: a token whose text is a substring of ``" \\t0123456789"``). An exempt token
  still pays the presence penalty once it has been sampled, exactly as in ChatRWKV.
- Randomness comes only from the ``torch.Generator`` the caller passes (or torch's global generator when
  none is given): the same seed and the same logits give the same tokens. Each non-greedy draw takes
  exactly one uniform number from the generator (inverse CDF over the kept tokens).
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
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

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
        _check(isinstance(k, int) and not isinstance(k, bool) and k >= 0, f"top_k must be an integer >= 0 (0 = off), got {k!r}")
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

    ``apply`` returns penalised logits (a new fp32 tensor); ``update`` records a sampled token. The counts
    live on ``device``; the exempt mask is kept on the CPU so ``update`` never waits for the GPU.
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
        _check(isinstance(vocab_size, int) and vocab_size > 0, f"vocab_size must be a positive integer, got {vocab_size!r}")
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
        self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)  # [V] decayed counts
        self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)  # [V] sampled at least once

    @classmethod
    def from_params(cls, params: SamplingParams, vocab_size: int, exempt: Optional[torch.Tensor] = None,
                    device: Optional[torch.device | str] = None) -> "PenaltyState":
        return cls(vocab_size, params.presence_penalty, params.frequency_penalty, params.penalty_decay, exempt, device)

    def penalty(self) -> torch.Tensor:
        """The amount subtracted from each logit: [V] fp32, zero for tokens never sampled."""
        amount = self.presence + self.counts * self.frequency
        return torch.where(self.seen, amount, torch.zeros_like(amount))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Penalised copy of ``logits`` (last dim = vocab) as fp32; the input is left untouched."""
        _check(logits.shape[-1] == self.vocab_size,
               f"logits have {logits.shape[-1]} entries in the last dim, penalties expect {self.vocab_size}")
        return logits.float() - self.penalty().to(logits.device)

    def update(self, token: int) -> None:
        """Record one sampled token: decay every count, then count the token (+0 if exempt)."""
        token = int(token)
        _check(0 <= token < self.vocab_size, f"token id {token} is outside the vocabulary (size {self.vocab_size})")
        self.counts.mul_(self.decay)
        if self.exempt is None or not bool(self.exempt[token]):
            self.counts[token] += 1.0
        self.seen[token] = True

    def clone(self) -> "PenaltyState":
        other = object.__new__(PenaltyState)
        other.__dict__.update(self.__dict__)
        other.counts = self.counts.clone()
        other.seen = self.seen.clone()
        return other


# Sorting the whole vocabulary is slow on a CPU (65536 floats: milliseconds), so the nucleus is searched
# among the tokens within these ratios of the top probability first, widening only when their mass is short.
_CANDIDATE_RATIOS = (1e-2, 1e-4, 0.0)


def _nucleus(probs: torch.Tensor, top_p: float) -> Optional[torch.Tensor]:
    """Ids of the tokens kept by top_p, most likely first, or None for "every token". [n] long

    Kept: every token at least as likely as the one at which the sorted cumulative mass first reaches
    top_p. The candidates are the head of the full sorted order, so their cumulative sums are the same.
    """
    if top_p >= 1.0:
        return None
    top = probs.max()
    for ratio in _CANDIDATE_RATIOS:
        ids = torch.nonzero(probs >= top * ratio).flatten()  # [m] candidate ids
        sorted_probs, order = torch.sort(probs[ids], descending=True)  # [m]
        cumulative = torch.cumsum(sorted_probs, dim=0)  # [m]
        if bool(cumulative[-1] >= top_p):
            cutoff = sorted_probs[int((cumulative < top_p).sum())]
            return ids[order[: int((sorted_probs >= cutoff).sum())]]
    return None  # rounding kept the total mass below top_p: keep everything


def _kept_tokens(logits: torch.Tensor, params: SamplingParams) -> Optional[torch.Tensor]:
    """Ids surviving top_p then top_k, most likely first, or None for every token."""
    ids = _nucleus(torch.softmax(logits, dim=0), params.top_p) if params.top_p < 1.0 else None
    if params.top_k <= 0:
        return ids
    if ids is None:
        return torch.topk(logits, min(params.top_k, logits.numel())).indices
    return ids[: params.top_k]


def _prepare_logits(logits: torch.Tensor, penalties: Optional[PenaltyState], ban_tokens: Iterable[int]) -> torch.Tensor:
    _check(logits.dim() == 1, f"logits must be 1-D [vocab], got shape {tuple(logits.shape)}")
    out = penalties.apply(logits) if penalties is not None else logits.float().clone()
    banned = list(ban_tokens)
    if banned:
        out[torch.tensor(banned, dtype=torch.long, device=out.device)] = -math.inf
    top = float(out.max())  # NaN if any NaN, +inf if any +inf, -inf if every token is banned
    _check(math.isfinite(top), "logits must have no NaN or +inf and at least one finite entry (not all banned)")
    return out


def _weights(logits: torch.Tensor, ids: Optional[torch.Tensor], temperature: float) -> torch.Tensor:
    """probs ** (1/T) renormalised over the kept ids, computed as softmax(logits / T). [n] or [V]"""
    kept_logits = logits if ids is None else logits[ids]
    return torch.softmax(kept_logits / temperature, dim=0)


def sampling_distribution(
    logits: torch.Tensor,
    params: SamplingParams,
    penalties: Optional[PenaltyState] = None,
    ban_tokens: Iterable[int] = (),
) -> torch.Tensor:
    """The exact [V] fp32 distribution ``sample_token`` draws from (one-hot at temperature 0)."""
    prepared = _prepare_logits(logits, penalties, ban_tokens)
    if params.greedy:
        return torch.nn.functional.one_hot(torch.argmax(prepared), prepared.numel()).to(torch.float32)
    ids = _kept_tokens(prepared, params)
    weights = _weights(prepared, ids, params.temperature)
    if ids is None:
        return weights
    return torch.zeros_like(prepared).index_put_((ids,), weights)


def _draw(weights: torch.Tensor, generator: Optional[torch.Generator]) -> int:
    """Index drawn with probability proportional to weights, by inverse CDF on one uniform number."""
    device = generator.device if generator is not None else weights.device
    cdf = torch.cumsum(weights.to(device=device, dtype=torch.float64), dim=0)  # [n]
    u = torch.rand(1, generator=generator, dtype=torch.float64, device=device) * cdf[-1]  # [1] in [0, total)
    return int(torch.searchsorted(cdf, u, right=True).clamp(max=cdf.numel() - 1)[0])


def sample_token(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: Optional[torch.Generator] = None,
    penalties: Optional[PenaltyState] = None,
    ban_tokens: Iterable[int] = (),
) -> int:
    """Draw the next token id from 1-D ``logits`` [vocab].

    ``penalties`` is read, not updated: call ``penalties.update(token)`` once the token is accepted.
    Its coefficients are its own (see ``PenaltyState.from_params``); ``params`` supplies temperature,
    top_p and top_k. ``ban_tokens`` get logit -inf (e.g. ``(0,)`` to forbid end-of-text).
    The uniform number comes from ``generator`` on its own device, so a CPU generator gives the same
    tokens whatever device the logits are on (up to floating-point differences in the logits).
    """
    prepared = _prepare_logits(logits, penalties, ban_tokens)
    if params.greedy:
        return int(torch.argmax(prepared))
    ids = _kept_tokens(prepared, params)
    index = _draw(_weights(prepared, ids, params.temperature), generator)
    return index if ids is None else int(ids[index])
