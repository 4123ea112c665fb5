"""Shared pytest fixtures: tiny random-weight checkpoints in every layout, built once per session.

Fixtures (all session-scoped, built lazily under one tmp directory):
- `checkpoint_factory`: a checkpoints.CheckpointFactory; `make_checkpoint` is its `make` method, for other shapes:
  `make_checkpoint("5.2", n_layer=3, n_embd=256, layout="hf", fmt="bin", shards=2, flavor="eagle")`.
- `tiny_pth`: one .pth per architecture, parametrized over "4", "5.0", "5.2" (L2, C128, H2, vocab 65536).
- `tiny_pth_v50_time_first`: a 5.0 .pth whose layers carry `att.time_first [H]` instead of `time_faaaa`.
- `int8_dot`: a function path -> name that runs the C++ kernels' int8 and int4 products of an RWKV_CPU_ISA path
  (e.g. "avx2": the AVX2 ones) for the rest of the test, and the CPU's own afterwards; "avx_vnni" skips the test
  where the CPU has AVX-VNNI and the build's compiler does not.
- `tiny_hf`: the same weights as `tiny_pth` written in the HF layout of that architecture, parametrized over
  (version, fmt, shards): safetensors unsharded and .bin in 2 shards; rwkv5 ones in the "world" config flavor.
Each yields a checkpoints.TinyCheckpoint: `.path`, `.oracle_pth` (a .pth of the same weights for the rwkv
package), `.version`, shape fields and `.state_dict()` (a fresh copy). Treat files as read-only.

The rwkv package reads RWKV_JIT_ON / RWKV_CUDA_ON when imported, so they are defaulted here, before any test
module imports it. Under pytest-xdist each worker gets its share of the cores for torch's CPU threads: without
that, N workers each start one thread per core and a 16-core machine runs 16x oversubscribed.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RWKV_JIT_ON", "1")
os.environ.setdefault("RWKV_CUDA_ON", "0")


def _share_the_cores_between_xdist_workers() -> None:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


_share_the_cores_between_xdist_workers()
import rwkv.model  # noqa: E402,F401  (imported once, here: it switches TF32 on, and the fixture below switches it off)


@pytest.fixture(autouse=True)
def fp32_means_fp32():
    """Importing the rwkv package turns TF32 matrix products on for the whole process; every test that compares
    fp32 results on a GPU needs them off."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

@pytest.fixture
def int8_dot(monkeypatch):
    from rwkv_chat.kernels import cpu_kernels
    from rwkv_chat.kernels.cpu_features import ISA_VARIABLE, PREFETCH_VARIABLE

    def use(path: str) -> str | None:
        monkeypatch.setenv(ISA_VARIABLE, path)
        product = cpu_kernels.configure()
        if path == "avx_vnni" and product == "avx2" and cpu_kernels.cpu_features().int8_dot == "avx_vnni":
            pytest.skip("the CPU has AVX-VNNI, this build's compiler not (GCC < 11, clang < 12)")
        return product
    yield use
    monkeypatch.delenv(ISA_VARIABLE, raising=False)
    monkeypatch.delenv(PREFETCH_VARIABLE, raising=False)  # a test that set a distance leaves the default behind
    if cpu_kernels.tried():
        cpu_kernels.configure()


from checkpoints import VERSIONS, CheckpointFactory  # noqa: E402  (tests/ is on sys.path under pytest)

TINY_SHAPE = {"n_layer": 2, "n_embd": 128}
HF_VARIANTS = [(version, fmt, shards) for version in VERSIONS for fmt, shards in (("safetensors", 1), ("bin", 2))]


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory) -> CheckpointFactory:
    return CheckpointFactory(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="session")
def make_checkpoint(checkpoint_factory):
    return checkpoint_factory.make


@pytest.fixture(scope="session", params=VERSIONS, ids=lambda version: f"v{version}")
def tiny_pth(request, checkpoint_factory):
    return checkpoint_factory.make(request.param, **TINY_SHAPE)


@pytest.fixture(scope="session")
def tiny_pth_v50_time_first(checkpoint_factory):
    return checkpoint_factory.make("5.0", **TINY_SHAPE, v50_time_first=True)


@pytest.fixture(scope="session", params=HF_VARIANTS, ids=lambda p: f"v{p[0]}-{p[1]}-{p[2]}shard")
def tiny_hf(request, checkpoint_factory):
    version, fmt, shards = request.param
    return checkpoint_factory.make(version, **TINY_SHAPE, layout="hf", fmt=fmt, shards=shards)
