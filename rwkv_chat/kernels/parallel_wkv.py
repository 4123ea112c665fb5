"""The RWKV recurrences (`wkv`) over a whole segment at once, every chunk in parallel (PyTorch).

What this module promises:
- `wkv5_segment` and `wkv4_segment` compute exactly the function of `model.wkv5_step` / `model.wkv4_step`
  applied token by token (up to fp32 rounding), with a fixed number of tensor operations per call: the tokens
  are cut into chunks of `chunk` tokens, the part of each output that comes from inside its chunk is computed
  for all chunks at once, and only the chunk-to-chunk hand-over of the state is sequential (one small
  operation per chunk, or one batched matrix product on GPUs: `state_scan="matrix"`).
- Decays are applied as exp(log_w * gap) with gap >= 0 and v4's keys as exp(k - max), so no exponent is
  positive except v4's exp(u) (time_first, a small number in every checkpoint): nothing overflows for any
  decay the checkpoints hold. v4 retries a segment in float64 if a float32 denominator underflows.
- Inputs are fp32 and are not changed.

It knows nothing of weights or of the model: only r, k, v, decays and a state.
"""

from __future__ import annotations

import torch

FACTORED_EXPONENT_LIMIT = 600.0  # v5: largest |log w| * chunk for the float64 factored form (exp(709) overflows)
TINY_DENOMINATOR = 1e-30  # v4: below this a float32 denominator may have lost digits (float32 normals end at ~1e-38)


def split_chunks(length: int, chunk: int) -> tuple[int, int]:
    """(tokens done in whole chunks, leftover tokens) for a segment of `length` tokens."""
    whole = length // chunk * chunk
    return whole, length - whole


# ---------------------------------------------------------------------------------------------- RWKV-5

def _chunk_starts_loop(chunk_decay, contrib, s0):
    """States at the start of each chunk and after the last. contrib [B,H,N,S,S]; chunk_decay [H,S]."""
    starts, s = [], s0
    factor = chunk_decay.unsqueeze(-1)  # [H, S, 1]: decays the key dimension
    for c in range(contrib.shape[2]):
        starts.append(s)
        s = torch.addcmul(contrib[:, :, c], factor, s)
    return torch.stack(starts, dim=2), s


def _chunk_starts_matrix(log_w, length, contrib, s0):
    """Same as _chunk_starts_loop as one batched product: start_c = w^(Lc) s0 + sum_{d<c} w^(L(c-1-d)) contrib_d."""
    n = contrib.shape[2]
    c = torch.arange(n + 1, device=contrib.device, dtype=torch.float32)
    d = torch.arange(n, device=contrib.device, dtype=torch.float32)
    gap = c[:, None] - 1 - d[None, :]  # [N+1, N]
    weights = torch.exp(log_w[:, :, None, None] * length * gap.clamp(min=0)) * (gap >= 0)  # [H, S, N+1, N]
    # [B,H,N+1,S(key),S(value)] = sum_d weights[h,s,c,d] * contrib[b,h,d,s,v]
    starts = torch.einsum("hscd,bhdsv->bhcsv", weights, contrib)
    from_s0 = torch.exp(log_w[:, :, None] * length * c)  # [H, S, N+1]
    starts = starts + from_s0.permute(0, 2, 1)[None, :, :, :, None] * s0[:, :, None]
    return starts[:, :, :n], starts[:, :, n]


def wkv5_chunks(log_w, u, r, k, v, s0, state_scan: str = "loop"):
    """Whole chunks: r, k, v [B, H, N, L, S] fp32; log_w = -exp(time_decay), u: [H, S]; s0 [B, H, S, S].

    Returns (out [B, H, N, L, S], state after the last chunk [B, H, S, S]).
    """
    length = r.shape[3]
    pos = torch.arange(length, device=r.device, dtype=torch.float32)
    gap = pos[:, None] - 1 - pos[None, :]  # [L, L]: t-1-j
    # inside each chunk: token t sees token j < t through w^(t-1-j), itself through u
    if float(-log_w.min()) * (length + 1) < FACTORED_EXPONENT_LIMIT:
        # w^(t-1-j) = w^t * w^-(j+1): two scaled copies and one matrix product per chunk, in float64 so the
        # growing factor w^-(j+1) stays finite (the limit above); entries j >= t are dropped
        r64 = r.double() * torch.exp(log_w.double()[:, None, :] * pos.double()[None, :, None])[:, None]
        k64 = k.double() * torch.exp(-log_w.double()[:, None, :] * (pos.double() + 1)[None, :, None])[:, None]
        scores = (r64 @ k64.transpose(-1, -2)).tril(diagonal=-1).float()  # [B, H, N, L, L]
    else:  # decays too fast for the factored form: the full [H, L, L, S] table
        decay = torch.exp(log_w[:, None, None, :] * gap.clamp(min=0)[None, :, :, None])  # [H, L, L, S]
        decay = decay * (gap >= 0)[None, :, :, None]
        scores = torch.einsum("bhnts,htjs,bhnjs->bhntj", r, decay, k)  # [B, H, N, L, L]
    scores = scores + torch.diag_embed((r * u[:, None, None, :] * k).sum(-1))
    out = scores @ v  # [B, H, N, L, S]
    # what each chunk adds to the state, as seen at its end
    to_end = torch.exp(log_w[:, None, :] * (length - 1 - pos)[None, :, None])  # [H, L, S]
    contrib = (k * to_end[:, None]).transpose(-1, -2) @ v  # [B, H, N, S, S]
    if state_scan == "matrix":
        starts, s_end = _chunk_starts_matrix(log_w, length, contrib, s0)
    else:
        starts, s_end = _chunk_starts_loop(torch.exp(log_w * length), contrib, s0)
    from_start = torch.exp(log_w[:, None, :] * pos[None, :, None])  # [H, L, S]: w^t
    out = out + (r * from_start[:, None]) @ starts
    return out, s_end


def wkv5_segment(log_w, u, r, k, v, s0, chunk: int = 16, state_scan: str = "loop"):
    """Any number of tokens: r, k, v [B, H, T, S] fp32 -> (out [B, H, T, S], final state [B, H, S, S])."""
    batch, heads, length, size = r.shape
    whole, rest = split_chunks(length, chunk)
    pieces, s = [], s0
    if whole:
        shape = (batch, heads, whole // chunk, chunk, size)
        out, s = wkv5_chunks(log_w, u, r[:, :, :whole].reshape(shape), k[:, :, :whole].reshape(shape),
                             v[:, :, :whole].reshape(shape), s, state_scan)
        pieces.append(out.reshape(batch, heads, whole, size))
    if rest:
        shape = (batch, heads, 1, rest, size)
        out, s = wkv5_chunks(log_w, u, r[:, :, whole:].reshape(shape), k[:, :, whole:].reshape(shape),
                             v[:, :, whole:].reshape(shape), s, "loop")
        pieces.append(out.reshape(batch, heads, rest, size))
    return torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0], s


# ---------------------------------------------------------------------------------------------- RWKV-4

def wkv4_chunks(w, u, k, v, aa, bb, pp, dtype=torch.float32):
    """Whole chunks in log space: k, v [B, N, L, C]; w = -exp(time_decay), u: [C]; aa, bb, pp: [B, C].

    Inside a chunk, token t sees token j < t with weight exp((t-1-j)w) * exp(k_j) and itself with
    exp(u) * exp(k_t); the state carried into the chunk is seen with exp(t*w + pp). The exp(k_j) are taken
    relative to the chunk's largest k (per channel), so the L x L weights are one [C, L, L] table of decays
    and the inside of every chunk is one batched matrix product. Should a denominator come out so small that
    float32 loses it (keys spread by more than ~80 inside one chunk), the chunks are computed again in float64
    (exact for spreads up to ~700). Returns (out [B, N, L, C] in k's dtype, aa, bb, pp after the last chunk).
    """
    batch, n, length, channels = k.shape
    f64 = dtype  # the working precision (named for the float64 retry)
    w64, u64 = w.to(f64), u.to(f64)
    k64, v64 = k.to(f64), v.to(f64)
    pos = torch.arange(length, device=k.device, dtype=f64)
    gap = pos[:, None] - 1 - pos[None, :]  # [L(t), L(j)]
    table = torch.exp(gap.clamp(min=0)[None] * w64[:, None, None]) * (gap >= 0)  # [C, L, L]
    table = table + torch.diag_embed(torch.exp(u64)[:, None].expand(channels, length))
    chunk_max = k64.amax(dim=2, keepdim=True)  # [B, N, 1, C]
    e_k = torch.exp(k64 - chunk_max)  # [B, N, L, C], <= 1
    # [C, L, L] @ [C, L, B*N*2] -> [C, L, B*N*2]: numerators (e_k * v) and denominators (e_k) together
    columns = torch.stack([e_k * v64, e_k], dim=-1).permute(3, 2, 0, 1, 4).reshape(channels, length, -1)
    inner = torch.bmm(table, columns).reshape(channels, length, batch, n, 2).permute(2, 3, 1, 0, 4)
    inner_num, inner_den = inner[..., 0], inner[..., 1]  # [B, N, L, C], scaled by exp(-chunk_max)
    # each chunk's own contribution to the state at its end, in log space (p_c, a_c, b_c)
    last = (length - 1 - pos)[:, None] * w64 + k64  # [B, N, L, C]
    own_p = last.amax(dim=2)  # [B, N, C]
    e_last = torch.exp(last - own_p.unsqueeze(2))
    own_a = (e_last * v64).sum(dim=2)
    own_b = e_last.sum(dim=2)
    # hand the state over chunk by chunk: starts[c] = state entering chunk c
    aa_in, bb_in, pp_in = aa, bb, pp
    aa, bb, pp = aa.to(f64), bb.to(f64), pp.to(f64)
    starts_a, starts_b, starts_p = [], [], []
    chunk_w = length * w64
    for c in range(n):
        starts_a.append(aa), starts_b.append(bb), starts_p.append(pp)
        decayed = chunk_w + pp
        p = torch.maximum(decayed, own_p[:, c])
        e1, e2 = torch.exp(decayed - p), torch.exp(own_p[:, c] - p)
        aa, bb, pp = e1 * aa + e2 * own_a[:, c], e1 * bb + e2 * own_b[:, c], p
    start_a, start_b, start_p = (torch.stack(x, dim=1) for x in (starts_a, starts_b, starts_p))  # [B, N, C]
    carried = pos[:, None] * w64 + start_p.unsqueeze(2)  # [B, N, L, C]
    top = torch.maximum(chunk_max, carried)
    e_inner, e_carried = torch.exp(chunk_max - top), torch.exp(carried - top)
    num = e_inner * inner_num + e_carried * start_a.unsqueeze(2)
    den = e_inner * inner_den + e_carried * start_b.unsqueeze(2)
    if dtype != torch.float64 and not bool(den.amin() > TINY_DENOMINATOR):
        return wkv4_chunks(w, u, k, v, *(x.to(k.dtype) for x in (aa_in, bb_in, pp_in)), dtype=torch.float64)
    out_dtype = k.dtype
    return (num / den).to(out_dtype), aa.to(out_dtype), bb.to(out_dtype), pp.to(out_dtype)


def wkv4_segment(w, u, k, v, aa, bb, pp, chunk: int = 16):
    """Any number of tokens: k, v [B, T, C] fp32 -> (out [B, T, C], aa, bb, pp)."""
    batch, length, channels = k.shape
    whole, rest = split_chunks(length, chunk)
    pieces = []
    if whole:
        shape = (batch, whole // chunk, chunk, channels)
        out, aa, bb, pp = wkv4_chunks(w, u, k[:, :whole].reshape(shape), v[:, :whole].reshape(shape), aa, bb, pp)
        pieces.append(out.reshape(batch, whole, channels))
    if rest:
        shape = (batch, 1, rest, channels)
        out, aa, bb, pp = wkv4_chunks(w, u, k[:, whole:].reshape(shape), v[:, whole:].reshape(shape), aa, bb, pp)
        pieces.append(out.reshape(batch, rest, channels))
    return (torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]), aa, bb, pp
