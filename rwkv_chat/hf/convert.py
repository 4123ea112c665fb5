"""Convert an RWKV checkpoint into a Hugging Face model directory.

    python -m rwkv_chat.hf.convert SRC OUT_DIR [--dtype fp32|bf16|fp16] [--max-shard-size 5GB]

SRC is anything `load_model` reads: an original BlinkDL `.pth` (RWKV-4, 5, 6 or 7), a Hugging Face-format
directory (transformers' `rwkv`, the published `rwkv5`/`rwkv6` layouts, flash-linear-attention's `rwkv7`), a
catalog name or a hub id. OUT_DIR receives config.json, model.safetensors (sharded with an index when larger
than --max-shard-size), generation_config.json, and the tokenizer files (tokenizer_config.json, the chat
template, rwkv_vocab_v20230424.txt). RWKV-4 becomes transformers' own `rwkv` model type (plain transformers'
RwkvForCausalLM loads it too); RWKV-5, 6 and 7 become this package's `rwkv5_world`, `rwkv6_world` and
`rwkv7_world` types, whose key names are the original ones renamed part by part as transformers does (the
published `rwkv5`/`rwkv6` names). Projections take --dtype; the embedding, norms, decays, mixing weights and
LoRA matrices stay fp32. Weight values are the original checkpoint's: unchanged except the few RWKV-5.0 files
that store `time_first`, which become `time_faaaa = exp(time_first)` (an fla directory is first brought back to
the original layout, its LoRA matrices transposed back).

After `import rwkv_chat`, `AutoModelForCausalLM.from_pretrained(OUT_DIR)`, `AutoTokenizer.from_pretrained(
OUT_DIR)` and `pipeline("text-generation", model=OUT_DIR)` work without trust_remote_code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

DEFAULT_MAX_SHARD_SIZE = "5GB"


def convert(source: str, out_dir: str | Path, dtype: str | torch.dtype = "fp32",
            max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE, progress=print) -> Path:
    """Write the Hugging Face directory for `source` into `out_dir` and return its path."""
    from .model import causal_lm_class_for
    from .register import register
    from .tokenizer import RwkvWorldTokenizer
    from ..loading.loader import load_model, resolve_device_dtype

    register()
    _, target = resolve_device_dtype("cpu", dtype)
    # fp16 loading turns on the runtime rescale, which divides weights: load fp32 and cast instead.
    model = load_model(source, device="cpu", dtype=torch.float32 if target == torch.float16 else target,
                       progress=progress)
    if target == torch.float16:
        projections = model.projection_weight_names()
        for name, param in model.named_parameters():
            if name in projections:
                param.data = param.data.to(torch.float16)
    hf_model = causal_lm_class_for(model.config.version).from_rwkv_model(model)  # config.dtype = projections'
    hf_model.generation_config.pad_token_id = 0
    out_dir = Path(out_dir)
    progress(f"writing {out_dir}")
    hf_model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    RwkvWorldTokenizer().save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rwkv_chat.hf.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="original .pth, transformers directory, catalog name or hub id")
    parser.add_argument("out_dir", help="directory to write (created if missing)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="dtype of the projections (default fp32; prefer bf16 to fp16: RWKV-4 World "
                             "overflows in fp16)")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                        help="largest weight file before sharding, e.g. 5GB, 500MB (default 5GB)")
    args = parser.parse_args(argv)
    from ..loading.loader import ModelLoadError

    try:
        out_dir = convert(args.source, args.out_dir, args.dtype, args.max_shard_size)
    except ModelLoadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"done: {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
