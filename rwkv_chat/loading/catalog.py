"""The published RWKV World and G1 models a user can pick, with their files and shapes.

Each `CatalogEntry` names one original checkpoint on the Hugging Face hub (BlinkDL/rwkv-4-world,
rwkv-5-world, rwkv-6-world, rwkv-7-world, rwkv7-g1), its shape, its size in bytes where the listing gave it
(else the size its shape implies in bf16, which is how BlinkDL stores them), and the converted
transformers-format repo where one exists. Memory estimates come from the shape alone. Nothing here downloads
anything.

The suggested default is RWKV-5 World 0.1B on a CPU (its fused CPU kernels make it the fastest small chat
model there) and an RWKV-7 G1 model on a GPU, the largest of 2.9B / 1.5B / 0.4B that fits the card.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import quant
from ..models import Architecture, architecture_for
from ..tokenizer import VOCAB_SIZE

HEAD_SIZE = 64  # every published World model
# int4: half a byte a weight plus an fp16 scale and min a group (loader.py keeps the head int8: HEAD_DTYPE)
BYTES_PER_PARAM = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2, torch.int8: 1,
                   quant.INT4: 0.5 + 4 / quant.INT4_GROUP}
HEAD_DTYPE = {quant.INT4: torch.int8}  # the head's dtype where it is not the model's


@dataclass(frozen=True)
class CatalogEntry:
    name: str  # what the picker shows, e.g. "RWKV-5 World 0.1B"
    version: str  # architecture: "4", "5.0", "5.2", "6", "7"
    repo: str  # hub repo of the original .pth
    filename: str
    listed_bytes: int | None  # the file's size as the hub lists it; None where it was not seen
    n_layer: int
    n_embd: int
    ctx_len: int = 4096
    hf_repo: str | None = None  # converted transformers-format repo, if published

    @property
    def architecture(self) -> Architecture:
        return architecture_for(self.version)

    @property
    def dim_ffn(self) -> int:
        return self.architecture.default_ffn_size(self.n_embd)

    @property
    def n_params(self) -> int:
        c, f, v, arch = self.n_embd, self.dim_ffn, VOCAB_SIZE, self.architecture
        return 2 * v * c + self.n_layer * (arch.time_mix_params(c, c) + arch.channel_mix_params(c, f))

    @property
    def file_bytes(self) -> int:
        """The download: the listed size, else the bf16 size of the shape (within 0.1% where both are known)."""
        return self.listed_bytes if self.listed_bytes is not None else self.weight_bytes(torch.bfloat16)

    def weight_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of every weight in `dtype`: the size of a checkpoint file stored in that dtype."""
        return int(self.n_params * BYTES_PER_PARAM[dtype])

    def state_bytes(self) -> int:
        """Bytes of one chat's fp32 RNN state."""
        return 4 * self.n_layer * self.architecture.state_floats_per_layer(self.n_embd, self.n_embd, HEAD_SIZE)

    def loaded_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of the weights once loaded in `dtype`: the embedding stays fp32 in every dtype (as in the
        reference), the head in HEAD_DTYPE where given; small vectors (norms, mixes, int8 scales) are left out."""
        head = BYTES_PER_PARAM[HEAD_DTYPE.get(dtype, dtype)]
        return int(self.weight_bytes(dtype) + VOCAB_SIZE * self.n_embd * (4 + head - 2 * BYTES_PER_PARAM[dtype]))

    def memory_bytes(self, dtype: torch.dtype) -> int:
        """Weights as loaded plus working room (activations of a 1024-token prefill, a few states)."""
        activations = 1024 * (self.dim_ffn + 6 * self.n_embd) * 4 + 1024 * VOCAB_SIZE * 4 // 16
        return self.loaded_bytes(dtype) + activations + 8 * self.state_bytes()



def _w4(size, date, file_bytes, n_layer, n_embd, hf_size, tag="v1"):
    return CatalogEntry(f"RWKV-4 World {size}", "4", "BlinkDL/rwkv-4-world",
                        f"RWKV-4-World-{size}-{tag}-{date}-ctx4096.pth", file_bytes, n_layer, n_embd,
                        hf_repo=f"RWKV/rwkv-4-world-{hf_size}")


def _w5(size, file_size, version, tag, date, file_bytes, n_layer, n_embd, ctx=4096, hf_repo=None, suffix=""):
    ctx_name = "ctx16k" if ctx == 16384 else "ctx4096"
    return CatalogEntry(f"RWKV-5 World {size}{suffix}", version, "BlinkDL/rwkv-5-world",
                        f"RWKV-5-World-{file_size}-{tag}-{date}-{ctx_name}.pth", file_bytes, n_layer, n_embd,
                        ctx_len=ctx, hf_repo=hf_repo)


def _w6(size, file_size, tag, date, listed_bytes, n_layer, n_embd):
    return CatalogEntry(f"RWKV-6 World {size}", "6", "BlinkDL/rwkv-6-world",
                        f"RWKV-x060-World-{file_size}-{tag}-{date}-ctx4096.pth", listed_bytes, n_layer, n_embd)


def _w7(size, tag, date, listed_bytes, n_layer, n_embd):
    return CatalogEntry(f"RWKV-7 World {size}", "7", "BlinkDL/rwkv-7-world",
                        f"RWKV-x070-World-{size}-{tag}-{date}-ctx4096.pth", listed_bytes, n_layer, n_embd)


def _g1(size, tag, date, ctx, listed_bytes, n_layer, n_embd):
    return CatalogEntry(f"RWKV-7 G1 {size}", "7", "BlinkDL/rwkv7-g1",
                        f"rwkv7-{tag}-{size.lower()}-{date}-ctx{ctx}.pth", listed_bytes, n_layer, n_embd,
                        ctx_len=ctx)


CATALOG: tuple[CatalogEntry, ...] = (
    _w4("0.1B", "20230520", 385_594_610, 12, 768, "169m"),
    _w4("0.4B", "20230529", 923_362_866, 24, 1024, "430m"),
    _w4("1.5B", "20230612", 3_155_281_586, 24, 2048, "1b5", tag="v1-fixed"),
    _w4("3B", "20230619", 6_125_597_618, 32, 2560, "3b"),
    _w4("7B", "20230626", 15_035_393_586, 32, 4096, "7b"),
    _w5("0.1B", "0.1B", "5.0", "v1", "20230803", 385_598_386, 12, 768, hf_repo="RWKV/rwkv-5-world-169m"),
    _w5("0.4B", "0.4B", "5.2", "v2", "20231113", 923_523_954, 24, 1024),
    _w5("1.5B", "1B5", "5.2", "v2", "20231025", 3_155_590_194, 24, 2048, hf_repo="RWKV/rwkv-5-world-1b5"),
    _w5("3B", "3B", "5.2", "v2", "20231113", 6_126_106_674, 32, 2560, hf_repo="RWKV/rwkv-5-world-3b"),
    _w5("3B", "3B", "5.2", "v2", "20231118", 6_126_106_467, 32, 2560, ctx=16384, suffix=" ctx16k"),
    _w5("7B", "7B", "5.2", "v2", "20240128", 15_036_197_526, 32, 4096, hf_repo="RWKV/v5-Eagle-7B-HF"),
    _w6("1.6B", "1B6", "v2.1", "20240328", None, 24, 2048),
    _w6("3B", "3B", "v2.1", "20240417", None, 32, 2560),
    _w6("7B", "7B", "v3", "20241112", None, 32, 4096),
    _w6("14B", "14B", "v2.1", "20240719", None, 61, 4096),
    _w7("0.1B", "v2.8", "20241210", None, 12, 768),
    _w7("0.4B", "v2.9", "20250107", None, 24, 1024),
    _w7("1.5B", "v3", "20250127", None, 24, 2048),
    _w7("2.9B", "v3", "20250211", 5_895_796_446, 32, 2560),
    _g1("0.1B", "g1d", "20260129", 8192, None, 12, 768),
    _g1("0.4B", "g1a", "20250905", 4096, None, 24, 1024),
    _g1("1.5B", "g1b", "20251202", 8192, None, 24, 2048),
    _g1("2.9B", "g1a", "20250924", 4096, 5_896_274_949, 32, 2560),
    _g1("7.2B", "g1g", "20260523", 8192, None, 32, 4096),
)

DEFAULT_MODEL = "RWKV-5 World 0.1B"  # on a CPU; see suggested_model
GPU_DEFAULTS = ("RWKV-7 G1 2.9B", "RWKV-7 G1 1.5B", "RWKV-7 G1 0.4B")  # the first that fits the card


def suggested_model(gpu_memory_bytes: int | None) -> str:
    """The default model: a G1 model on a GPU with `gpu_memory_bytes` (the largest of GPU_DEFAULTS whose bf16
    weights and working room take at most half the card), RWKV-5 World 0.1B without a GPU (None)."""
    if gpu_memory_bytes is None:
        return DEFAULT_MODEL
    for name in GPU_DEFAULTS:
        if get_entry(name).memory_bytes(torch.bfloat16) <= gpu_memory_bytes // 2:
            return name
    return GPU_DEFAULTS[-1]


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum() or ch == ".")


def find_entry(name: str) -> CatalogEntry | None:
    """The entry whose name matches `name`, ignoring case, spaces and dashes ("rwkv-5-world-0.1b" works)."""
    wanted = _key(name)
    for entry in CATALOG:
        if _key(entry.name) == wanted:
            return entry
    return None


def get_entry(name: str) -> CatalogEntry:
    entry = find_entry(name)
    if entry is None:
        names = ", ".join(e.name for e in CATALOG)
        raise KeyError(f"unknown model {name!r}; the catalog has: {names}")
    return entry
