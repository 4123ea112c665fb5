"""Scripts under Triton's interpreter (TRITON_INTERPRET=1: the kernels run on CPU tensors), for the kernels' tests.

Triton reads the variable when it is imported, so each script runs in a subprocess of its own (the repository
and tests/ on its path), after a prelude that mends the interpreter where the installed NumPy needs it.
`run_interpreted(script, *args)` returns the script's stdout and fails the test with its stderr when it fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PRELUDE = textwrap.dedent("""
    import numpy as np
    import triton.runtime.interpreter as interpreter
    if np.lib.NumpyVersion(np.__version__) >= "2.4.0":
        # triton-lang/triton#9171: the interpreter's range() over a kernel's scalar argument calls int() on a
        # one-element array, which NumPy 2.4 refuses; upstream's fix, applied here until Triton ships it
        patch_tensor = interpreter._patch_lang_tensor

        def patched(tensor, scope):
            patch_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))
        interpreter._patch_lang_tensor = patched
""")


def run_interpreted(script: str, *args: str, timeout: float = 1800) -> str:
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(script), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout
