"""One entry point from whatever a user has to a placed model: `load_model(source, device, dtype)`.

`source` may be
- a catalog name ("RWKV-5 World 0.1B"): its original .pth is downloaded from the hub;
- a path to an original checkpoint file (`.pth`, BlinkDL layout);
- a path to a Hugging Face-format directory: transformers' `rwkv` key names (RWKV/rwkv-4-world-*), the
  `rwkv5` names (RWKV/rwkv-5-world-*), the `rwkv6` names (RWKV/v6-Finch-*-HF), flash-linear-attention's
  `rwkv7` names (fla-hub/rwkv7-*), or this package's converted rwkv5/6/7_world directories; safetensors or
  .bin, sharded or not (loading/hf_names.py maps every layout to the original names). No remote code is ever
  run: only the weights and config.json are read;
- a hub repo id ("RWKV/rwkv-5-world-169m"), or "owner/repo:file.pth" for one original file in a repo.

Downloads go through huggingface_hub into its normal cache, so HF_HOME and HF_HUB_OFFLINE are honoured.
Every weight file is read with `weights_only=True`. Version and shape come from the weights alone. Weights
are placed with accelerate on the chosen device: projections and embeddings in the chosen dtype, the rest
(norms, decays, mixes) in fp32. fp16 turns on the every-6-layers rescale that RWKV-4 World needs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

import torch

from ..kernels import cpu_features, cpu_kernels, quant
from ..models import RwkvConfig, RwkvModel, UnsupportedCheckpoint
from ..models.layers import lora_storage_dtype
from ..runtime.fast_path import attach_fast_path
from .catalog import CatalogEntry, find_entry
from .hf_names import original_state_dict

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16, "int8": torch.int8,
          "int4": quant.INT4}
LOW_BIT = (torch.int8, quant.INT4)  # formats the loader quantises projections into
FP16_RESCALE_EVERY = 6
HF_WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.bin"]

Progress = Callable[[str], None]


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what failed and what to do."""


# ---------------------------------------------------------------------------------------- public entry

def load_model(source: str | os.PathLike, device: str | torch.device | None = None,
               dtype: torch.dtype | str | None = None, progress: Progress | None = None,
               fast: bool | None = None) -> RwkvModel:
    """Load `source` (see module docstring) onto `device` in `dtype`.

    Defaults: CUDA in bf16 when a GPU is present, else CPU in fp32. dtype "int8" (or torch.int8) stores the
    projection matrices as int8 with per-row scales (kernels/quant.py): half of bf16's memory. dtype "int4" (or
    torch.int4; CPUs only) stores the layers' projections as 4-bit integers with a scale and min per group of 64
    columns and the head as int8 (build_model says why): about a third of bf16's memory. `fast` attaches
    the fast runner (runtime.fast_path: fused kernels, CUDA graphs); by default it is on except for fp32 on CPU,
    which keeps the plain reference path. `progress` is called with short human-readable stage descriptions
    ("downloading ...", "placing ...").
    """
    device, dtype = resolve_device_dtype(device, dtype)
    report = progress or (lambda message: None)
    state_dict = read_weights(source, report)
    config = config_from_state_dict(state_dict)
    report(f"placing RWKV-{config.version} L{config.n_layer} D{config.n_embd} on {device} ({dtype_name(dtype)})")
    fast = fast_by_default(device, dtype) if fast is None else fast
    if device.type == "cpu":
        report(cpu_features.describe())  # the path its products take (a bad RWKV_CPU_ISA is refused here)
    if device.type == "cpu" and (fast or dtype != torch.float32) and not cpu_kernels.tried():
        report("preparing the CPU kernels (compiled on the first run only, about a minute)")
    return build_model(config, state_dict, device, dtype, fast)


def fast_by_default(device: torch.device, dtype: torch.dtype) -> bool:
    """The fast path is the default except for fp32 on a CPU, which keeps the plain reference path."""
    return device.type == "cuda" or dtype != torch.float32


def resolve_device_dtype(device, dtype) -> tuple[torch.device, torch.dtype]:
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for but no CUDA GPU is available; use device='cpu'")
    if device.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"unsupported device {device}; use 'cpu' or 'cuda'")
    if dtype in (None, "auto"):
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPES:
            raise ModelLoadError(f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16, int8, int4")
        dtype = DTYPES[dtype.lower()]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16, *LOW_BIT):
        raise ModelLoadError(f"unsupported dtype {dtype}; use float32, bfloat16, float16, int8 or int4")
    if dtype == quant.INT4 and device.type != "cpu":
        raise ModelLoadError(f"dtype int4 runs on CPUs only for now, not on {device.type}: set the dtype (--dtype, "
                             "RWKV_DTYPE) to int8 for the smallest weights on a GPU, or bf16, or use device cpu")
    return device, dtype


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
            torch.int8: "int8", quant.INT4: "int4"}.get(dtype, str(dtype))


# ---------------------------------------------------------------------------------------- reading

def read_weights(source, report: Progress) -> dict[str, torch.Tensor]:
    """Any source -> a state dict with the original checkpoint's key names."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_file():
        return read_pth(path)
    if path.is_dir():
        return read_hf_dir(path)
    entry = find_entry(text)
    if entry is not None:
        return read_pth(download_catalog_file(entry, report))
    if re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w./-]+\.pth)?", text):
        repo, _, filename = text.partition(":")
        if filename:
            return read_pth(download_file(repo, filename, report))
        return read_hf_dir(download_repo(repo, report))
    raise ModelLoadError(f"cannot load {text!r}: it is not an existing file or directory, a catalog name, "
                         "or a hub repo id like 'RWKV/rwkv-5-world-169m'")


def torch_load(path: Path) -> dict:
    """torch.load with weights_only=True, memory-mapped when the file format allows it. A file that cannot be
    read says why in the package's words (torch's own message suggests weights_only=False, which we never use)."""
    if path.stat().st_size == 0:
        raise ModelLoadError(f"cannot read {path}: the file is empty (0 bytes); it was not written or copied whole")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) file
    except Exception as error:  # unpickling refused, truncated file, not a checkpoint at all, ...
        raise ModelLoadError(f"cannot read {path} as a PyTorch checkpoint: {_load_failure(error)}") from None


def _load_failure(error: Exception) -> str:
    text = str(error)
    unpickler = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    if unpickler is not None:
        return (f"it is not a plain file of tensors ({unpickler.group(1).strip()}); it may hold Python objects or "
                "code, and checkpoints are only ever read as plain tensors (weights_only=True)")
    if isinstance(error, EOFError):
        return "the file ends too early (a truncated download or copy?)"
    first = text.strip().splitlines()[0] if text.strip() else "no detail"
    return f"{type(error).__name__}: {first}"


def read_pth(path: Path) -> dict[str, torch.Tensor]:
    state_dict = torch_load(path)
    if not isinstance(state_dict, dict) or "emb.weight" not in state_dict:
        raise ModelLoadError(f"{path} is not an RWKV checkpoint (no 'emb.weight' tensor)")
    return dict(state_dict)


def read_hf_dir(directory: Path) -> dict[str, torch.Tensor]:
    """A Hugging Face-format directory in any layout hf_names.py knows (transformers' rwkv names and the rwkv5,
    rwkv6 and this package's layouts modelled on them; flash-linear-attention's rwkv7) -> the original layout."""
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise ModelLoadError(f"{directory} holds no model.safetensors or pytorch_model.bin")
    raw: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file
            try:
                raw.update(load_file(str(file)))
            except Exception as error:  # noqa: BLE001 - a damaged or foreign file
                raise ModelLoadError(f"cannot read {file} as a safetensors file (damaged, truncated or not "
                                     f"safetensors): {error}") from None
        else:
            raw.update(torch_load(file))
    return hf_to_original_names(raw)


def hf_to_original_names(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Names (and, for fla's layout, the few tensors it stores differently) -> the original checkpoint's."""
    renamed = original_state_dict(raw)
    if "emb.weight" not in renamed:
        raise ModelLoadError("the directory's weights are not an RWKV model (no embeddings)")
    return renamed


# ---------------------------------------------------------------------------------------- hub

def _hub_error(what: str, error: Exception) -> ModelLoadError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    hint = ("HF_HUB_OFFLINE is set and the file is not in the cache" if offline
            else "the Hugging Face hub could not be reached and the file is not cached")
    return ModelLoadError(
        f"could not get {what}: {hint} ({type(error).__name__}: {error}). Download the file on a machine "
        "with network access (it lands in the HF cache, see HF_HOME) or pass a local path: "
        "--model /path/to/RWKV-x.pth or a transformers-format directory.")


def download_file(repo: str, filename: str, report: Progress) -> Path:
    from huggingface_hub import hf_hub_download
    report(f"downloading {repo}/{filename}")
    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename))
    except Exception as error:
        raise _hub_error(f"{repo}/{filename}", error) from error


def download_catalog_file(entry: CatalogEntry, report: Progress) -> Path:
    return download_file(entry.repo, entry.filename, report)


def download_repo(repo: str, report: Progress) -> Path:
    from huggingface_hub import snapshot_download
    report(f"downloading {repo}")
    try:
        return Path(snapshot_download(repo_id=repo, allow_patterns=HF_WEIGHT_PATTERNS))
    except Exception as error:
        raise _hub_error(repo, error) from error


# ---------------------------------------------------------------------------------------- shape

def config_from_state_dict(state_dict: dict[str, torch.Tensor]) -> RwkvConfig:
    """The config of an original checkpoint; ModelLoadError when no supported architecture reads it."""
    try:
        return RwkvConfig.from_state_dict(state_dict)
    except UnsupportedCheckpoint as error:
        raise ModelLoadError(str(error)) from None


def canonical_state_dict(config: RwkvConfig, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original names -> this package's parameter names and conventions."""
    out = {}
    for key, tensor in state_dict.items():
        if key.startswith("blocks.0.ln0."):
            key = key.replace("blocks.0.ln0.", "ln0.")
        renamed = config.architecture.canonical_key(key, tensor)
        if renamed is not None:
            out[renamed[0]] = renamed[1]
    return out


# ---------------------------------------------------------------------------------------- placement

def build_model(config: RwkvConfig, state_dict: dict[str, torch.Tensor], device: torch.device,
                dtype: torch.dtype, fast: bool | None = None) -> RwkvModel:
    """Build on the meta device, then place every tensor with accelerate (no full fp32 copy in between).

    Projections (the matrices that are multiplied) take `dtype`; RWKV-6/7's LoRA factors bf16 where
    layers.lora_storage_dtype says (on CPUs whose prefills multiply them in bf16, and on any CPU where their values
    are bf16s: a bf16 checkpoint's); everything else stays fp32: the embedding is only looked up, and rounding it
    perturbs every later layer, as in the reference. int8 and int4:
    projections are placed in bf16 (CUDA) or fp32 (CPU), then quantised one at a time (no full-precision peak).
    int4 keeps the head in int8: on the really trained tiny models an int4 head cost most of int4's argmax
    agreement (RWKV-4 96.6% → 98.2% with it in int8; docs/PERFORMANCE.md), for about 8% more bytes a token at
    1.5B."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device

    weights = canonical_state_dict(config, state_dict)
    with init_empty_weights():
        model = RwkvModel(config)
    params = dict(model.named_parameters())
    projections, loras = model.projection_weight_names(), model.lora_factor_names()
    missing = sorted(set(params) - set(weights))
    unexpected = sorted(set(weights) - set(params))
    if missing or unexpected:
        raise ModelLoadError(f"checkpoint does not match RWKV-{config.version}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    for name, param in params.items():
        tensor = weights[name]
        if tensor.numel() != param.numel():
            raise ModelLoadError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
        placed = dtype
        if dtype in LOW_BIT:
            placed = torch.bfloat16 if device.type == "cuda" else torch.float32
        target = placed if name in projections else torch.float32
        if name in loras:
            target = lora_storage_dtype(device, dtype, tensor)
        set_module_tensor_to_device(model, name, device, value=tensor.reshape(param.shape), dtype=target)
        if dtype in LOW_BIT and name in projections:
            module = model.get_submodule(name.rsplit(".", 1)[0])
            quantize_projection(module, dtype if name != "head.weight" else torch.int8)
    model.eval()
    if device.type == "cpu" and dtype != torch.float32:
        cpu_kernels.kernels()  # every architecture's low-precision products on CPUs use them (kernels/quant.py)
    if dtype == torch.float16:
        model.enable_fp16_rescale(FP16_RESCALE_EVERY)
    if fast_by_default(device, dtype) if fast is None else fast:
        attach_fast_path(model)
    return model


def quantize_projection(projection: torch.nn.Module, dtype: torch.dtype = torch.int8) -> None:
    """Store a `Projection`'s weight as int8 with a per-row `weight_scale` buffer, or as int4 with its groups in
    `weight_scale` (in place). A matrix whose width int4's groups do not divide (none in published models) stays
    int8."""
    if dtype == quant.INT4 and quant.int4_fits(projection.weight.shape[1]):
        q, scale = quant.quantize_int4(projection.weight.data)
    else:
        q, scale = quant.quantize_rows(projection.weight.data)
    projection.weight = torch.nn.Parameter(q, requires_grad=False)
    projection.register_buffer("weight_scale", scale.to(q.device), persistent=True)
