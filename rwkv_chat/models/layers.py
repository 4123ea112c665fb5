"""The pieces every RWKV architecture shares: projections, token shift, the channel mix and the norm constants.

Promises: `Projection` returns fp32 and computes in its weight's dtype (int8 weights through the kernels' int8
product; it takes fp32 rows, or bf16 ones that a bf16 product reads as they are); `token_shift`/`mix` are the
reference token-shift formulas and `ShiftMixes` RWKV-6/7's (a CPU prefill's in one C++ pass);
`ChannelMix` is the feed-forward half of a block of RWKV-4/5/6 (`sigmoid(r) * (relu(k)^2 @ Wv)`);
`layer_norm`/`group_norm` run in fp32 with the reference epsilons; `Padding` says where a prompt padded at its
end stops; `lora_dtype`/`lora_product` run the time mixes' low-rank products in bf16 where the projections beside
them run in bf16 (a prefill: bf16 and int8 models on GPUs, bf16/int8/int4 ones on CPUs with bf16 units), in fp32
everywhere else, and `lora_storage_dtype` keeps their factors in bf16 on CPUs where those products read them so or
no value changes. It knows no version: what differs between versions lives in their modules."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cpu_kernels, quant

LAYER_NORM_EPS = 1e-5
GROUP_NORM_EPS = 64e-5  # ln_x: GroupNorm of the head outputs (equals GN(out / 8, eps=1e-5) for head size 64)
WKV_CHUNK = 32  # tokens per chunk of the reference's parallel recurrence


class Projection(nn.Linear):
    """A bias-free linear layer that takes and returns fp32 and computes in its weight's dtype.

    An int8 weight (loading quantises them) carries a per-row `weight_scale` buffer."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor, widen: bool = True) -> torch.Tensor:
        """x @ Wᵀ in fp32; widen=False: a product that ran in bf16/fp16 stays so (quant.linear)."""
        return quant.linear(x, self.weight, getattr(self, "weight_scale", None), widen=widen)

    def squared_relu(self, x: torch.Tensor) -> torch.Tensor:
        """relu(forward(x))² for the next projection to read: a product that ran in bf16 (a CPU prefill's GEMM,
        a GPU's) stays bf16, squared in place. The same values the next projection reads after an fp32 square
        (a bf16 number's square is exact in fp32, so either way it is rounded to bf16 once), two passes less."""
        return relu_square_(self(x, widen=False))

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """As forward, for a decode step's rows (one per chat): quant.decode_linear."""
        return quant.decode_linear(x, self.weight, getattr(self, "weight_scale", None))

    def stored(self) -> list[torch.Tensor]:
        """[the weight as stored, its per-row scale (an empty tensor unless int8)]: what the C++ steps read."""
        return [self.weight.detach(), getattr(self, "weight_scale", torch.empty(0))]


@dataclass(frozen=True)
class Padding:
    """Where a prompt padded at its end stops, on its device: `real` bool [1, T, 1] (True for the prompt's tokens),
    `last` long [1] (the index of its last token). The architectures that read padding (`reads_padded_prompts`)
    take `real` in their time mix (or, in the fast runner, their `prefill_wkv`) and leave the memory as it is for
    the other tokens."""

    real: torch.Tensor
    last: torch.Tensor

    @classmethod
    def of(cls, length: int, valid: torch.Tensor) -> "Padding":
        """The first `valid` (long [1], 1..length) of `length` tokens are real."""
        positions = torch.arange(length, device=valid.device)
        return cls((positions < valid).view(1, length, 1), valid - 1)

    def at_last(self, tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
        """Each tensor's row at the last real token (index `last` along `dim`), concatenated along `dim`: the token
        shifts a padded read leaves in the state."""
        return torch.cat([t.index_select(dim, self.last) for t in tensors], dim)


def lora_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype a time mix's LoRA products of `x` run in, beside projections stored as `weight`: bf16 where the
    projections' own products of these rows run in bf16, a prefill of at least quant.MANY_ROWS rows: on a CPU with
    bf16 units, the projections bf16, int8 or int4 (quant.many_rows_dtype), where bf16 products are 2-5x faster
    than fp32 at the LoRAs' shapes; on a GPU, the projections bf16 or int8 (widened to bf16 for such rows), where
    fp32 LoRAs ran without tensor cores (RWKV-7 7B on an H200, 1,024-token prompts: 13.3k -> 14.5k tok/s with bf16
    ones). fp32 otherwise (decode steps, fp32 and fp16 models)."""
    rows = x.numel() // x.shape[-1]
    if rows < quant.MANY_ROWS or x.device.type not in ("cpu", "cuda"):
        return torch.float32
    if x.device.type == "cuda":
        return torch.bfloat16 if weight.dtype in (torch.bfloat16, torch.int8) else torch.float32
    return torch.bfloat16 if quant.many_rows_dtype(weight) == torch.bfloat16 else torch.float32


def lora_storage_dtype(device: torch.device, dtype: torch.dtype, factor: torch.Tensor | None = None) -> torch.dtype:
    """The dtype a LoRA factor (`factor`: its values as the checkpoint holds them) of a model whose projections are
    `dtype` is kept in on `device`. bf16 on a CPU for bf16, int8 and int4 models where either its prefills multiply
    the LoRAs in bf16 anyway (lora_dtype: a CPU with bf16 units), so those read them as they are, bit for bit as
    before, or every value of the factor is a bf16 (a bf16 checkpoint's, as the released .pth files are), so only the
    bytes change: a CPU without bf16 units widens them exactly, in its prefills' fp32 products and as its decode
    step reads them. Either way a decode step reads half the bytes (RWKV-7 0.1B int8: 1.8 of a layer's 8.9 MB were
    its fp32 LoRAs; on a Zen 3, 168 -> 182 tok/s, the same logits). fp32 everywhere else (GPUs, fp32 and fp16
    models, other factors on CPUs without bf16 units). On a GPU the fused decode step's packing holds them in bf16
    where no value changes (kernels/lora_triton.LowRank.pack: a bf16 checkpoint's)."""
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.int8, quant.INT4):
        if quant.cpu_features().native_matmul(torch.bfloat16) or (
                factor is not None and quant.holds_bf16_values(factor)):
            return torch.bfloat16
    return torch.float32


def lora_product(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x @ weight with both in `dtype` (lora_dtype); the result in `dtype` (callers widen it where they need)."""
    return x @ weight if dtype == weight.dtype == x.dtype else x.to(dtype) @ weight.to(dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last dimension in fp32, with the reference epsilon."""
    return F.layer_norm(x, x.shape[-1:], weight.float(), bias.float(), LAYER_NORM_EPS)


def group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """ln_x: GroupNorm of [N, A] head outputs in fp32, with the reference epsilon."""
    return F.group_norm(x, groups, weight.float(), bias.float(), GROUP_NORM_EPS)


def token_shift(xx: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """Each position's previous token: [B, T, C] from xx [B, T, C] and the state's last token prev [B, C]."""
    return torch.cat([prev.unsqueeze(1), xx[:, :-1]], dim=1)


class ShiftMixes:
    """RWKV-6/7's token-shift mixes of one input: `ShiftMixes(xx, prev, dtype)(mixes, lora)` is xx + (shifted -
    xx) * (mixes[p] + lora[p]) -> [P, B, T, C] in `dtype` (fp32 or bf16), computed in fp32 with the product and
    sum fused, as torch.addcmul's AVX2 kernel fuses them (xx [B, T, C] fp32, prev [B, C], mixes [P, C] fp32, lora
    [P, B, T, C] fp32 or bf16, or None).
    CPU tensors take the C++ kernels' one pass once the process has built them (cpu_kernels.built_for); elsewhere
    PyTorch's addcmul, with `shifted - xx` computed once for all the calls on the same input."""

    def __init__(self, xx: torch.Tensor, prev: torch.Tensor, dtype: torch.dtype = torch.float32):
        self.xx, self.prev, self.dtype = xx, prev, dtype
        self.kernels = cpu_kernels.built_for(xx) if dtype in (torch.float32, torch.bfloat16) else None
        self._difference = None

    def __call__(self, mixes: torch.Tensor, lora: torch.Tensor | None = None) -> torch.Tensor:
        if self.kernels is not None:
            lora = None if lora is None else lora.contiguous()
            return self.kernels.lora_shift_mixes(self.xx.float().contiguous(), self.prev.float(),
                                                 mixes.float().contiguous(), lora, self.dtype == torch.bfloat16)
        if self._difference is None:
            self._difference = token_shift(self.xx, self.prev) - self.xx
        weights = mixes.view(mixes.shape[0], 1, 1, -1).float()
        weights = weights if lora is None else lora + weights
        return torch.addcmul(self.xx, self._difference, weights).to(self.dtype)


def mix(xx: torch.Tensor, shifted: torch.Tensor, time_mix: torch.Tensor) -> torch.Tensor:
    """Interpolate between the current and the previous token, per channel (reference formula)."""
    return xx * time_mix + shifted * (1 - time_mix)


def relu_square_(x: torch.Tensor) -> torch.Tensor:
    """relu(x)², written over x (a product's fresh output): the same bits as relu(x).square() in one pass less and
    no new tensor (a 1,024 x 2,688 fp32 prefill block: 1.8 -> 0.7 ms on a 2-core Zen 4); a contiguous fp32 CPU
    tensor in one C++ pass where the kernels are built (cpu_kernels.built_for), with the same bits."""
    square = getattr(cpu_kernels.built_for(x), "relu_square_", None)
    if square is not None and x.dtype == torch.float32 and x.is_contiguous():
        return square(x)
    return torch.relu_(x).square_()


def ffn_size(n_embd: int) -> int:
    """The channel-mix width of RWKV-5.2 and later: int(3.5 C) rounded down to a multiple of 32."""
    return int(3.5 * n_embd) // 32 * 32


class ChannelMix(nn.Module):
    """The feed-forward half of a block: sigmoid(r) * (relu(k)^2 @ Wv)."""

    def __init__(self, n_embd: int, dim_ffn: int):
        super().__init__()
        c, f = n_embd, dim_ffn
        self.time_mix_k = nn.Parameter(torch.empty(1, 1, c))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, c))
        self.key = Projection(c, f)
        self.receptance = Projection(c, c)
        self.value = Projection(f, c)

    def forward(self, xx: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        shifted = token_shift(xx, prev)
        k = self.key.squared_relu(mix(xx, shifted, self.time_mix_k))
        return torch.sigmoid(self.receptance(mix(xx, shifted, self.time_mix_r))) * self.value(k)
