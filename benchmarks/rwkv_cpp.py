"""rwkv.cpp (github.com/RWKV/rwkv.cpp, ggml) as a reference in benchmarks/bench.py: `--refs rwkv,rwkv.cpp`.

Nothing of rwkv.cpp is part of this repository: this module drives a checkout of it that has a built library
(RWKV_CPP_DIR, default /work/rwkvcpp). The checkpoint bench builds is saved to a temporary .pth and converted
with the checkout's own python/convert_pytorch_to_ggml.py (FP32, FP16) and python/quantize.py (Q8_0, Q5_1 and
others, from the FP32 file), run as subprocesses; the files are loaded through the checkout's Python wrapper
(python/rwkv_cpp, imported from the checkout at run time) with bench's thread count. Prefill is one
`eval_sequence` call over the prompt (RWKV-4: `eval_sequence_in_chunks` of 16 tokens, see prefill_chunk;
RWKV_CPP_CHUNK=N sets chunks of N tokens, 0 one call), decode one `eval` per token. Rows are named
"rwkv.cpp" with the file format as dtype; `annotate` adds ours' ratio to the fastest rwkv.cpp format of each
phase to the ours rows' notes. RWKV_CPP_FORMATS picks the formats (default FP32,FP16,Q8_0,Q5_1).

Getting it (outside this repository; the tests never need it):

    git clone --recursive https://github.com/RWKV/rwkv.cpp /work/rwkvcpp
    cd /work/rwkvcpp && cmake -B build -DCMAKE_BUILD_TYPE=Release -DRWKV_BUILD_SHARED_LIBRARY=ON \\
        -DRWKV_STANDALONE=ON && cmake --build build -j"$(nproc)" --config Release
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

DEFAULT_DIR = "/work/rwkvcpp"
DEFAULT_FORMATS = ("FP32", "FP16", "Q8_0", "Q5_1")
LIBRARY_NAMES = {"win32": "rwkv.dll", "cygwin": "rwkv.dll", "darwin": "librwkv.dylib"}
# where its CMake build leaves the library, relative to the checkout (as its wrapper's own search)
LIBRARY_PLACES = ("build/bin/Release", "build/bin", "build", "bin/Release", "bin", ".")
HOW_TO_GET = ("git clone --recursive https://github.com/RWKV/rwkv.cpp {dir} && cd {dir} && cmake -B build "
              "-DCMAKE_BUILD_TYPE=Release -DRWKV_BUILD_SHARED_LIBRARY=ON -DRWKV_STANDALONE=ON && "
              "cmake --build build -j$(nproc) --config Release   (or set RWKV_CPP_DIR to a built checkout)")


def checkout_dir(path: str | None = None) -> Path:
    return Path(path or os.environ.get("RWKV_CPP_DIR") or DEFAULT_DIR)


def library_path(checkout: Path, platform: str = sys.platform) -> Path | None:
    """The built shared library in a checkout, or None."""
    name = LIBRARY_NAMES.get(platform, "librwkv.so")
    return next((checkout / place / name for place in LIBRARY_PLACES if (checkout / place / name).is_file()), None)


def formats(spec: str | None = None) -> list[str]:
    """Formats to run: RWKV_CPP_FORMATS (comma list, case-insensitive) or the default four; FP32/FP16 come
    from the converter, the others from quantize.py."""
    spec = spec if spec is not None else os.environ.get("RWKV_CPP_FORMATS", "")
    names = [s.strip().upper() for s in spec.split(",") if s.strip()]
    return names or list(DEFAULT_FORMATS)


def prefill_chunk(sd: dict, setting: str | None = None) -> int:
    """0: prefill in one `eval_sequence` call; N: `eval_sequence_in_chunks` of N tokens. RWKV_CPP_CHUNK decides;
    unset, RWKV-4 (no ln_x) takes rwkv.cpp's recommended 16, because its RWKV-4 graph unrolls the wkv per token
    and one call over a few hundred tokens overruns ggml's context pool, which aborts the process."""
    setting = setting if setting is not None else os.environ.get("RWKV_CPP_CHUNK", "")
    if setting.strip():
        return int(setting)
    return 0 if "blocks.0.att.ln_x.weight" in sd else 16


def best_ratios(rows) -> dict[str, tuple[float, float, str, str]]:
    """Per ours row (by dtype): (prefill ×, decode ×, best prefill format, best decode format) against the
    fastest rwkv.cpp row in each phase. Rows without a number are left out."""
    cpp = [r for r in rows if r.name == "rwkv.cpp" and r.prefill_tps == r.prefill_tps and r.decode_tps == r.decode_tps]
    if not cpp:
        return {}
    bp = max(cpp, key=lambda r: r.prefill_tps)
    bd = max(cpp, key=lambda r: r.decode_tps)
    return {r.dtype: (r.prefill_tps / bp.prefill_tps, r.decode_tps / bd.decode_tps, bp.dtype, bd.dtype)
            for r in rows if r.name == "ours"}


def annotate(rows) -> None:
    """Adds '× rwkv.cpp best (prefill F / decode F): p / d' to each ours row's note."""
    ratios = best_ratios(rows)
    for r in rows:
        if r.name == "ours" and r.dtype in ratios:
            p, d, fp, fd = ratios[r.dtype]
            r.note = (r.note + "; " if r.note else "") + f"× rwkv.cpp best ({fp} / {fd}): {p:.2f} / {d:.2f}"


class RwkvCppImpl:
    """bench's Impl interface over rwkv.cpp's RWKVModel."""

    def __init__(self, library, model_path: str, fmt: str, threads: int, chunk: int = 0):
        from rwkv_cpp import rwkv_cpp_model
        self.model = rwkv_cpp_model.RWKVModel(library, model_path, thread_count=threads)
        self.name, self.dtype, self.chunk = "rwkv.cpp", fmt, chunk

    def prefill(self, tokens):
        if self.chunk:
            return self.model.eval_sequence_in_chunks(list(tokens), None, chunk_size=self.chunk)
        return self.model.eval_sequence(list(tokens), None)

    def step(self, token, state):
        return self.model.eval(token, state)  # a new state buffer: bench replays decode from one state

    def close(self):
        self.model.free()


def _run(args: list, cwd: Path) -> None:
    done = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(map(str, args[:1]))} failed: {(done.stderr or done.stdout).strip()[-300:]}")


def factories(sd: dict, threads: int, path: str | None = None) -> list:
    """One factory per format (bench's run_impl calls them), after converting `sd` with the checkout's scripts;
    [] and a line on stderr saying how to get rwkv.cpp when it is not there. The converted files live in a
    temporary folder, removed once no factory holds it (a process killed or aborted leaves it in /tmp)."""
    checkout = checkout_dir(path)
    lib = library_path(checkout)
    scripts = checkout / "python"
    if lib is None or not (scripts / "rwkv_cpp" / "rwkv_cpp_model.py").is_file():
        print(f"[bench] rwkv.cpp: no built checkout at {checkout}; get it with: {HOW_TO_GET.format(dir=checkout)}",
              file=sys.stderr, flush=True)
        return []
    if str(scripts) not in sys.path:
        sys.path.insert(0, str(scripts))
    chunk = prefill_chunk(sd)
    tmp = tempfile.TemporaryDirectory(prefix="rwkv_cpp_bench_")
    folder = Path(tmp.name)
    out = []
    try:
        from rwkv_cpp import rwkv_cpp_shared_library
        library = rwkv_cpp_shared_library.RWKVSharedLibrary(str(lib))
        torch.save({k: v.detach().float().cpu().contiguous() for k, v in sd.items()}, folder / "model.pth")
        made = {}
        for fmt in formats():
            target = folder / f"model-{fmt}.bin"
            if fmt in made:
                continue
            if fmt in ("FP32", "FP16"):
                _run([scripts / "convert_pytorch_to_ggml.py", folder / "model.pth", target, fmt], scripts)
            else:
                if "FP32" not in made:
                    made["FP32"] = folder / "model-FP32.bin"
                    _run([scripts / "convert_pytorch_to_ggml.py", folder / "model.pth", made["FP32"], "FP32"], scripts)
                _run([scripts / "quantize.py", made["FP32"], target, fmt], scripts)
            made[fmt] = target
        (folder / "model.pth").unlink()
        for fmt in formats():
            out.append(lambda fmt=fmt, tmp=tmp: RwkvCppImpl(library, str(made[fmt]), fmt, threads, chunk))
        # the files stay until every factory is gone; FP32 kept only if asked for
        if "FP32" in made and "FP32" not in formats():
            made["FP32"].unlink()
    except Exception as error:  # noqa: BLE001 - a library or conversion that fails leaves rwkv.cpp out, with a note
        print(f"[bench] rwkv.cpp: left out: {type(error).__name__}: {str(error)[:300]}",
              file=sys.stderr, flush=True)
        tmp.cleanup()
        return []
    return out
