"""RWKV-6 and RWKV-7 against the reference (the `rwkv` package; RWKV-7 through RWKV_x070 in a subprocess), on
random-weight checkpoints of several shapes, plus what the loader reads from their keys and shapes."""

from __future__ import annotations

import pytest
import torch

from rwkv_chat import load_model
from rwkv_chat.loading.loader import ModelLoadError
from rwkv_chat.models import rwkv6, rwkv7
from rwkv_chat.state import RwkvState
from checkpoints import RANDOM_LORA, make_state_dict, save_pth
from reference import assert_states_passed_in_stay_unchanged, random_tokens, reference_run
from reference_v7 import reference_v7_logits
from wkv7_oracle import wkv7_inputs, wkv7_token_loop

FP32_TOLERANCE = 1e-3
# (version, n_layer, n_embd, head_size): head sizes 64 (every published model) and 32; 3 heads of 64
SHAPES = [("6", 2, 128, 64), ("6", 3, 192, 32), ("7", 2, 128, 64), ("7", 3, 192, 64), ("7", 2, 128, 32)]
PROMPT, DECODE = random_tokens(300, seed=11), random_tokens(16, seed=12)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


def reference_logits(version: str, pth, prompt, decode) -> torch.Tensor:
    if version == "7":
        return reference_v7_logits(pth, prompt, decode)
    rows = []
    logits, state = reference_run(pth, prompt)
    rows.append(logits)
    for token in decode:
        logits, state = reference_run(pth, [token], state)
        rows.append(logits)
    return torch.stack(rows)


def our_logits(model, prompt, decode) -> torch.Tensor:
    logits, state = model.forward(prompt)
    rows = [logits]
    for token in decode:
        logits, state = model.forward([token], state)
        rows.append(logits)
    return torch.stack(rows)


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: f"v{s[0]}-L{s[1]}D{s[2]}N{s[3]}")
def checkpoint(request, tmp_path_factory):
    version, n_layer, n_embd, head_size = request.param
    weights = make_state_dict(version, n_layer, n_embd, head_size=head_size, seed=n_layer * 7 + head_size)
    path = save_pth(weights, tmp_path_factory.mktemp("v67") / f"v{version}-{n_layer}-{n_embd}-{head_size}.pth")
    return version, path, weights


def test_fp32_logits_match_reference_over_a_300_token_prefill_and_16_decode_steps(checkpoint):
    version, path, _ = checkpoint
    model = load_model(path, device="cpu", dtype="fp32")
    expected = reference_logits(version, path, PROMPT, DECODE)
    ours = our_logits(model, PROMPT, DECODE)
    assert ours.shape == expected.shape
    assert expected.abs().max() > 5  # logits spread over several units: the tolerance is meaningful
    assert (ours - expected).abs().max().item() <= FP32_TOLERANCE


@pytest.mark.parametrize("split", [1, 15, 16, 17, 150, 299])
def test_a_split_prefill_with_the_carried_state_equals_the_whole_prefill(checkpoint, split):
    _, path, _ = checkpoint
    model = load_model(path, device="cpu", dtype="fp32")
    whole_logits, whole = model.forward(PROMPT)
    _, first = model.forward(PROMPT[:split])
    split_logits, rest = model.forward(PROMPT[split:], first)
    assert (split_logits - whole_logits).abs().max().item() <= 1e-4
    assert torch.allclose(rest.wkv, whole.wkv, atol=1e-4, rtol=1e-4)
    assert torch.allclose(rest.shift, whole.shift, atol=1e-5)


def test_config_comes_from_the_shapes(checkpoint):
    version, path, weights = checkpoint
    config = load_model(path, device="cpu").config
    n_embd = weights["emb.weight"].shape[1]
    assert config.version == version and config.n_embd == n_embd and config.vocab_size == 65536
    assert config.head_size == (weights["blocks.0.att.time_faaaa"] if version == "6"
                                else weights["blocks.0.att.r_k"]).shape[-1]
    assert config.lora == RANDOM_LORA[version]
    assert config.dim_ffn == weights["blocks.0.ffn.key.weight"].shape[0]


def test_state_contract_and_batched_decoding(checkpoint):
    _, path, _ = checkpoint
    model = load_model(path, device="cpu", dtype="fp32")
    assert_states_passed_in_stay_unchanged(model)
    states = [model.forward(random_tokens(20 + i, seed=i))[1] for i in range(3)]
    ids = torch.tensor([5, 900, 40000])
    logits, batched = model.decode_batch(ids, RwkvState.stack(states))
    for i, state in enumerate(states):
        alone, new = model.forward([int(ids[i])], state)
        assert (logits[i] - alone).abs().max().item() <= 1e-4
        # the batched and the lone step sum in different orders; from states of ~40 (fp32 ulp 3.8e-6) they differ
        # by up to 1.3e-5 here, depending on which products the prefill took (whether the C++ kernels were built
        # before this test ran). A row of another sequence is off by its whole size.
        assert torch.allclose(batched[i].wkv, new.wkv, rtol=1e-5, atol=1e-4)
    state = states[0]
    assert state.nbytes == 4 * (state.shift.numel() + state.wkv.numel())
    assert state.clone().equal(state)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [16, 32])
@pytest.mark.parametrize("batch,length,group", [(2, 150, 1 << 26), (1, 128, 1), (3, 1, 1 << 26), (2, 33, 1),
                                                (1, 65, 2 * 3 * 32 * 32 * 16)])
def test_rwkv6_chunked_recurrence_equals_its_one_token_steps(chunk, batch, length, group, device, monkeypatch):
    """All chunks at once (whole chunks, a ragged last one, fewer tokens than a chunk; the [L, L, N] decays made
    in one go, chunk by chunk, or in groups) against a float64 token-by-token loop, strong decays included."""
    monkeypatch.setattr(rwkv6, "CHUNK_GROUP_FLOATS", group)
    gen = torch.Generator().manual_seed(length)
    heads, size = 3, 16
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    r, k, v = (rand(batch, heads, length, size) for _ in range(3))
    s0 = rand(batch, heads, size, size)
    log_w = -torch.exp(rand(batch, heads, length, size) * 2)  # decays down to e^-e^6 per token
    u = rand(heads, size)
    state, steps = s0, []
    for t in range(length):
        out, state = rwkv6.wkv6_step(log_w[:, :, t], u, r[:, :, t], k[:, :, t], v[:, :, t], state)
        steps.append(out)
    chunk_out, chunk_state = rwkv6.wkv6_chunks(*(x.transpose(1, 2).to(device) for x in (log_w,)), u.to(device),
                                               *(x.transpose(1, 2).to(device) for x in (r, k, v)), s0.to(device),
                                               chunk)
    assert torch.allclose(chunk_out.transpose(1, 2).cpu(), torch.stack(steps, 2), atol=1e-9)
    assert torch.allclose(chunk_state.cpu(), state, atol=1e-9)


def wkv7_chunks(inputs, s0, chunk, device="cpu"):
    """rwkv7.wkv7_chunks on [B, H, T, N] inputs (it reads and writes [B, T, H, N]), on `device`."""
    out, state = rwkv7.wkv7_chunks(*(x.transpose(1, 2).to(device) for x in inputs), s0.to(device), chunk)
    return out.transpose(1, 2).cpu(), state.cpu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [rwkv7.WKV7_CHUNK, rwkv7.WKV7_GPU_CHUNK])
@pytest.mark.parametrize("batch,length", [(2, 150), (1, 128), (3, 1), (1, 2), (2, 63), (1, 65)])
def test_rwkv7_chunked_recurrence_equals_its_one_token_steps(chunk, batch, length, device):
    """All chunks at once (whole chunks, a ragged last one, fewer tokens than a chunk) against a float64
    token-by-token loop of the step."""
    inputs, s0 = wkv7_inputs(batch, length, seed=length)
    expected, expected_state = wkv7_token_loop(inputs, s0)
    out, state = wkv7_chunks(inputs, s0, chunk, device)
    assert out.shape == expected.shape
    assert torch.allclose(out, expected, atol=1e-9)
    assert torch.allclose(state, expected_state, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [rwkv7.WKV7_CHUNK, rwkv7.WKV7_GPU_CHUNK])
def test_rwkv7_chunked_recurrence_in_fp32_with_the_strongest_decays_stays_within_1e_5(chunk, device):
    """fp32, as the models run it, with every decay at its strongest (the largest in-chunk factors)."""
    inputs, s0 = wkv7_inputs(2, 150, seed=1, strongest=True)
    expected, expected_state = wkv7_token_loop(inputs, s0)
    out, state = wkv7_chunks([x.float() for x in inputs], s0.float(), chunk, device)
    assert out.dtype == torch.float32
    assert ((out - expected).abs().max() / expected.abs().max()).item() < 1e-5
    assert ((state - expected_state).abs().max() / expected_state.abs().max()).item() < 1e-5


def test_rwkv7_first_layer_value_residual_weights_are_ignored_as_the_reference_does(tmp_path):
    plain = make_state_dict("7", 2, 128, seed=5)
    extra = make_state_dict("7", 2, 128, seed=5, v7_v_in_first_layer=True)
    assert "blocks.0.att.v0" in extra and "blocks.0.att.v0" not in plain
    path = save_pth(extra, tmp_path / "extra.pth")
    tokens = random_tokens(40, seed=3)
    ours = load_model(path, device="cpu").forward(tokens)[0]
    assert (ours - reference_v7_logits(path, tokens, [])[0]).abs().max().item() <= FP32_TOLERANCE


@pytest.mark.parametrize("extra_key,shape", [("blocks.0.ffn.s_emb.weight", (65536, 32)),
                                             ("blocks.0.qkv.weight", (384, 128))])
def test_deep_embed_checkpoints_are_refused_clearly(tmp_path, extra_key, shape):
    weights = make_state_dict("7", 2, 128, seed=1)
    weights[extra_key] = torch.zeros(shape)
    with pytest.raises(ModelLoadError, match="DeepEmbed"):
        load_model(save_pth(weights, tmp_path / "rwkv7a.pth"), device="cpu")


def test_bf16_and_int8_track_fp32(checkpoint):
    _, path, _ = checkpoint
    tokens = random_tokens(120, seed=9)
    reference = load_model(path, device="cpu", dtype="fp32").forward(tokens, all_logits=True)[0]
    for dtype in ("bf16", "int8"):
        logits = load_model(path, device="cpu", dtype=dtype).forward(tokens, all_logits=True)[0]
        assert (logits - reference).abs().max().item() < 3.0  # random weights amplify rounding; real ones below
