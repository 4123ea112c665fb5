"""The RWKV-7 oracle: the `rwkv` package's `RWKV_x070`, which exists only when RWKV_V7_ON=1 is set before the
package is imported (process-wide), so it runs in a subprocess of its own.

`reference_v7_logits(pth, prompt, decode_tokens, initial_wkv=None)` -> fp32 logits [1 + len(decode_tokens), vocab]:
after the prompt read whole, then after each decode token read one at a time with the carried state. With
`initial_wkv` [L, H, N, N] the reference starts from that time-mix memory (token shifts zero), as a state file
gives it.
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
state = None
if spec["wkv"]:
    state = model.generate_zero_state()
    wkv = torch.load(spec["wkv"], weights_only=True)
    for i in range(wkv.shape[0]):
        state[i * 3 + 1] = wkv[i].float().clone()
logits, state = model.forward(spec["prompt"], state)
rows = [logits.float()]
for token in spec["decode"]:
    logits, state = model.forward([token], state)
    rows.append(logits.float())
torch.save(torch.stack(rows), out_file)
"""


def reference_v7_logits(pth: Path, prompt: list[int], decode_tokens: list[int],
                        initial_wkv: torch.Tensor | None = None) -> torch.Tensor:
    pth = Path(pth)
    if pth.suffix != ".pth":
        raise ValueError("the reference loads `name + '.pth'`: pass a .pth path")
    env = dict(os.environ, RWKV_V7_ON="1", RWKV_JIT_ON="1", RWKV_CUDA_ON="0")
    with tempfile.TemporaryDirectory() as tmp:
        tokens_file, out_file = Path(tmp) / "tokens.json", Path(tmp) / "logits.pt"
        wkv_file = ""
        if initial_wkv is not None:
            wkv_file = str(Path(tmp) / "wkv.pt")
            torch.save(initial_wkv.contiguous(), wkv_file)
        tokens_file.write_text(json.dumps({"prompt": list(prompt), "decode": list(decode_tokens),
                                           "wkv": wkv_file}))
        done = subprocess.run([sys.executable, "-c", _SCRIPT, str(pth.with_suffix("")), str(tokens_file),
                               str(out_file)], env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"the RWKV-7 reference failed:\n{done.stderr[-3000:]}")
        return torch.load(out_file, weights_only=True)
