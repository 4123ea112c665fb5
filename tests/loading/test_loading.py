"""Loading from every source a user has, with clear errors when something is wrong."""

from __future__ import annotations

import pickle

import pytest
import torch

from rwkv_chat import ModelLoadError, load_model
from rwkv_chat.loading.loader import config_from_state_dict
from rwkv_chat.loading.catalog import CATALOG, DEFAULT_MODEL, find_entry, get_entry
from reference import random_tokens, reference_run


def test_every_hf_layout_loads_with_reference_numerics(tiny_hf):
    model = load_model(tiny_hf.path, device="cpu")
    assert model.config.version == tiny_hf.version
    tokens = random_tokens(64, seed=1)
    logits, _ = model.forward(tokens)
    expected, _ = reference_run(tiny_hf.oracle_pth, tokens)
    assert (logits - expected).abs().max().item() <= 1e-3


def test_eagle_flavoured_rwkv5_dir_loads_without_remote_code(make_checkpoint):
    ckpt = make_checkpoint("5.2", layout="hf", fmt="bin", flavor="eagle")
    model = load_model(ckpt.path, device="cpu")
    expected, _ = reference_run(ckpt.oracle_pth, [1, 2, 3])
    assert (model.forward([1, 2, 3])[0] - expected).abs().max().item() <= 1e-3


def test_version_and_shape_come_from_the_weights(make_checkpoint):
    for version in ("4", "5.0", "5.2"):
        config = load_model(make_checkpoint(version, n_layer=3, n_embd=192).path).config
        assert (config.version, config.n_layer, config.n_embd, config.n_head) == (
            version, 3, 192, 0 if version == "4" else 3)
        assert config.dim_ffn == (int(3.5 * 192) // 32 * 32 if version == "5.2" else 4 * 192)


def test_default_placement_is_cuda_bf16_with_a_gpu_else_cpu_fp32(tiny_pth):
    model = load_model(tiny_pth.path)
    if torch.cuda.is_available():
        assert model.device.type == "cuda" and model.dtype == torch.bfloat16
    else:
        assert model.device.type == "cpu" and model.dtype == torch.float32
    bf16 = load_model(tiny_pth.path, device="cpu", dtype="bf16")
    assert bf16.blocks[0].att.key.weight.dtype == torch.bfloat16
    assert bf16.blocks[0].att.time_decay.dtype == torch.float32 and bf16.emb.weight.dtype == torch.float32


def test_bad_device_or_dtype_is_refused_clearly(tiny_pth):
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA GPU"):
            load_model(tiny_pth.path, device="cuda")
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model(tiny_pth.path, dtype="fp8")


def test_catalog_name_without_network_gives_an_actionable_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants as hub_constants
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelLoadError) as error:
        load_model(DEFAULT_MODEL)
    message = str(error.value)
    assert "BlinkDL/rwkv-5-world" in message and "HF_HUB_OFFLINE" in message and "local path" in message
    with pytest.raises(ModelLoadError, match="RWKV/rwkv-5-world-169m"):
        load_model("RWKV/rwkv-5-world-169m")


def test_catalog_name_is_served_from_the_hub_cache(monkeypatch, tmp_path, tiny_pth):
    """The real download path: hf_hub_download finds the file in HF_HOME's cache when offline."""
    entry = get_entry("RWKV-5 World 0.4B")
    snapshot = tmp_path / "hub" / "models--BlinkDL--rwkv-5-world" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / entry.filename).write_bytes(tiny_pth.path.read_bytes())
    (tmp_path / "hub" / "models--BlinkDL--rwkv-5-world" / "refs").mkdir()
    (tmp_path / "hub" / "models--BlinkDL--rwkv-5-world" / "refs" / "main").write_text("0" * 40)
    import huggingface_hub.constants as hub_constants
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    stages = []
    model = load_model("rwkv-5-world-0.4b", progress=stages.append)
    assert model.config.version == tiny_pth.version
    assert stages[0].startswith("downloading BlinkDL/rwkv-5-world/") and stages[1].startswith("placing")


def test_non_rwkv_and_unsafe_files_are_refused(tmp_path):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ModelLoadError, match="not an RWKV checkpoint"):
        load_model(tmp_path / "other.pth")

    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"emb.weight": Payload()}))
    with pytest.raises(ModelLoadError, match="cannot read") as refused:
        load_model(tmp_path / "evil.pth")
    assert "not a plain file of tensors" in str(refused.value) and "weights_only=True" in str(refused.value)
    assert "weights_only` set to `False` will likely succeed" not in str(refused.value)  # torch's advice: never
    with pytest.raises(ModelLoadError, match="cannot load 'no such thing'"):
        load_model("no such thing")


def test_broken_files_say_what_is_wrong_with_them(tmp_path, make_checkpoint):
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty.pth: the file is empty \\(0 bytes\\)"):
        load_model(tmp_path / "empty.pth")
    (tmp_path / "noise.pth").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ModelLoadError, match="cannot read .*noise.pth as a PyTorch checkpoint: .+"):
        load_model(tmp_path / "noise.pth")
    whole = (make_checkpoint("5.2").path).read_bytes()
    (tmp_path / "cut.pth").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ModelLoadError, match="cannot read .*cut.pth as a PyTorch checkpoint: .+"):
        load_model(tmp_path / "cut.pth")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors").write_bytes(bytes(range(256)))
    with pytest.raises(ModelLoadError, match="cannot read .*model.safetensors as a safetensors file"):
        load_model(tmp_path / "hf")


def test_a_checkpoint_between_architectures_is_named_and_refused(tiny_pth):
    weights = torch.load(tiny_pth.path, weights_only=True)
    weights["blocks.0.att.time_maa_x"] = torch.zeros(1)  # an RWKV-6 key, the rest of another version
    with pytest.raises(ModelLoadError, match="looks like an RWKV-6 checkpoint, but its weights do not fit one: .blocks.0.att.time_"):
        config_from_state_dict(weights)


def test_catalog_covers_every_published_size():
    names = {entry.name for entry in CATALOG}
    for size in ("0.1B", "0.4B", "1.5B", "3B", "7B"):
        assert f"RWKV-4 World {size}" in names and f"RWKV-5 World {size}" in names
    assert "RWKV-5 World 3B ctx16k" in names
    assert {f"RWKV-6 World {size}" for size in ("1.6B", "3B", "7B", "14B")} <= names
    assert {f"RWKV-7 World {size}" for size in ("0.1B", "0.4B", "1.5B", "2.9B")} <= names
    assert {f"RWKV-7 G1 {size}" for size in ("0.1B", "0.4B", "1.5B", "2.9B", "7.2B")} <= names
    listed = [entry for entry in CATALOG if entry.listed_bytes is not None]
    assert {"RWKV-7 World 2.9B", "RWKV-7 G1 2.9B", "RWKV-5 World 7B"} <= {entry.name for entry in listed}
    for entry in listed:  # shapes (LoRA widths included) agree with the published file sizes (bf16 weights)
        assert abs(entry.file_bytes / entry.weight_bytes(torch.bfloat16) - 1) < 0.002
    for entry in CATALOG:
        assert entry.file_bytes == (entry.listed_bytes or entry.weight_bytes(torch.bfloat16))
    assert find_entry("rwkv-4-world-7b").n_embd == 4096 and get_entry("RWKV-5 World 0.1B").version == "5.0"
    with pytest.raises(KeyError, match="unknown model"):
        get_entry("RWKV-9 World 1T")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.int4])
@pytest.mark.parametrize("version", ["5.2", "6", "7"])
def test_catalog_memory_estimate_matches_a_loaded_model(make_checkpoint, dtype, version):
    """The picker's memory figure counts what loading really holds (the fp32 embedding included)."""
    from rwkv_chat.loading.catalog import CatalogEntry
    entry = CatalogEntry("tiny", version, "", "", None, n_layer=2, n_embd=256)
    model = load_model(make_checkpoint(version, n_layer=2, n_embd=256).path, device="cpu", dtype=dtype)
    held = sum(t.nbytes for t in model.state_dict().values())
    assert abs(held / entry.loaded_bytes(dtype) - 1) < 0.02
