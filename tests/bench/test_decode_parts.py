"""`python -m benchmarks.decode_parts`: its settings and left-out kernels apply inside their block and are restored
after it; it refuses a setting that names nothing, a row count past the graphs' buckets and a machine without CUDA,
clearly."""

from __future__ import annotations

import pytest
import torch

from benchmarks import decode_parts
from rwkv_chat.kernels import rwkv7_triton, triton_kernels


def test_a_setting_holds_inside_its_block_and_is_restored():
    preload = triton_kernels.GEMV_CONFIGS["int8"]["preload"]
    chunk = triton_kernels.LN_MIX_CHUNK
    with decode_parts.setting("rwkv_chat.kernels.triton_kernels.GEMV_CONFIGS.int8.preload", preload + 2):
        with decode_parts.setting("rwkv_chat.kernels.triton_kernels.LN_MIX_CHUNK", 64):
            assert triton_kernels.GEMV_CONFIGS["int8"]["preload"] == preload + 2
            assert triton_kernels.LN_MIX_CHUNK == 64
    assert triton_kernels.GEMV_CONFIGS["int8"]["preload"] == preload
    assert triton_kernels.LN_MIX_CHUNK == chunk
    with pytest.raises(RuntimeError):
        with decode_parts.setting("rwkv_chat.kernels.triton_kernels.LN_MIX_CHUNK", 64):
            raise RuntimeError("a failed capture")
    assert triton_kernels.LN_MIX_CHUNK == chunk


@pytest.mark.parametrize("path", ["rwkv_chat.kernels.triton_kernels.NO_SUCH_SETTING",
                                  "rwkv_chat.kernels.triton_kernels.GEMV_CONFIGS.int8.no_such_key",
                                  "no_such_package.SETTING"])
def test_a_setting_that_names_nothing_is_refused(path):
    with pytest.raises(ValueError, match="--set"):
        with decode_parts.setting(path, 1):
            pass


def test_left_out_kernels_launch_nothing_inside_the_block_and_come_back_after():
    ln_mix, wkv5, wkv7 = triton_kernels.ln_mix, triton_kernels.wkv5_decode, rwkv7_triton.wkv7_decode
    x = torch.randn(1, 8)
    r = torch.randn(2, 3, 16)  # split-K partials [S, rows, A]
    with decode_parts.left_out(("ln_mix", "wkv")):
        assert triton_kernels.ln_mix(x, None, None, None) is x
        y = triton_kernels.wkv5_decode(r, r, r, None, None, None, None, None, None, None, torch.bfloat16, 1e-5)
        assert y.shape == (3, 16) and y.dtype == torch.bfloat16
        y = rwkv7_triton.wkv7_decode(r, r, r, None, None, None, None, None, True, None, None, None, None, None,
                                     None, None, None, None, None, torch.float16, 1e-5, 0.5)
        assert y.shape == (3, 16) and y.dtype == torch.float16
    assert (triton_kernels.ln_mix, triton_kernels.wkv5_decode, rwkv7_triton.wkv7_decode) == (ln_mix, wkv5, wkv7)


def test_it_checks_its_settings_first_and_needs_cuda(capsys):
    with pytest.raises(ValueError, match="NO_SUCH"):
        decode_parts.main(["--set", "x=rwkv_chat.kernels.triton_kernels.NO_SUCH=1"])
    with pytest.raises(ValueError, match="--rows: 257 is not in 1..256"):
        decode_parts.main(["--rows", "257"])
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal is for machines without it")
    assert decode_parts.main(["--set", "x=rwkv_chat.kernels.triton_kernels.LN_MIX_CHUNK=64"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
