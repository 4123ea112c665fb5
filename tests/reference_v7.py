"""The RWKV-7 oracle: the `rwkv` package's `RWKV_x070`, which exists only when RWKV_V7_ON=1 is set before the
package is imported (process-wide), so it runs in a subprocess of its own.

`reference_v7_logits(pth, prompt, decode_tokens)` -> fp32 logits [1 + len(decode_tokens), vocab]: after the prompt
read whole, then after each decode token read one at a time with the carried state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

_SCRIPT = r"""
import json, sys, torch
from rwkv.model import RWKV
path, tokens_file, out_file = sys.argv[1:4]
spec = json.load(open(tokens_file))
model = RWKV(model=path, strategy="cpu fp32")
logits, state = model.forward(spec["prompt"], None)
rows = [logits.float()]
for token in spec["decode"]:
    logits, state = model.forward([token], state)
    rows.append(logits.float())
torch.save(torch.stack(rows), out_file)
"""


def reference_v7_logits(pth: Path, prompt: list[int], decode_tokens: list[int]) -> torch.Tensor:
    pth = Path(pth)
    if pth.suffix != ".pth":
        raise ValueError("the reference loads `name + '.pth'`: pass a .pth path")
    env = dict(os.environ, RWKV_V7_ON="1", RWKV_JIT_ON="1", RWKV_CUDA_ON="0")
    with tempfile.TemporaryDirectory() as tmp:
        tokens_file, out_file = Path(tmp) / "tokens.json", Path(tmp) / "logits.pt"
        tokens_file.write_text(json.dumps({"prompt": list(prompt), "decode": list(decode_tokens)}))
        done = subprocess.run([sys.executable, "-c", _SCRIPT, str(pth.with_suffix("")), str(tokens_file),
                               str(out_file)], env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"the RWKV-7 reference failed:\n{done.stderr[-3000:]}")
        return torch.load(out_file, weights_only=True)
