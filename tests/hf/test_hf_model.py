"""The transformers model classes on converted tiny checkpoints, against the `rwkv` reference package.

Covers: logits and greedy generation equal the reference for RWKV-4, 5.0 and 5.2; sampling; feeding a new
prompt on top of a returned state; padded batches; labels; beam search bookkeeping; save_pretrained round
trip; bf16 loading; device_map="auto"; plain transformers reading the RWKV-4 output.
"""

from __future__ import annotations

import pytest
import torch
from hf_helpers import PROMPT, converted_dir, reference_greedy, reference_logits, register_hf

register_hf()

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from rwkv_chat import load_model  # noqa: E402
from rwkv_chat.hf.model import CACHE_NAME, RwkvCache, Rwkv4WorldForCausalLM, Rwkv5WorldForCausalLM  # noqa: E402

# The cache's keyword: transformers' current name (`cache` from 5.24 on), and the older `past_key_values`,
# which transformers >= 5.24 still accepts (deprecated) and earlier versions use alone.
CACHE_KEYWORDS = sorted({CACHE_NAME, "past_key_values"})
ALL_VERSIONS = ["4", "5.0", "5.2"]  # behaviour that depends on the architecture
STATE_LAYOUTS = ["4", "5.2"]  # the two state layouts (v4 aa/bb/pp, v5 key-by-value matrices)
ONE_VERSION = ["5.2"]  # plumbing that is the same for every architecture
_loaded: dict = {}


@pytest.fixture
def converted(request, checkpoint_factory):
    """(checkpoint, directory, model, tokenizer) for the test's `version` parameter, loaded once per module."""
    version = request.node.callspec.params["version"]
    if version not in _loaded:
        checkpoint, out_dir = converted_dir(checkpoint_factory, version)
        _loaded[version] = (checkpoint, out_dir, AutoModelForCausalLM.from_pretrained(out_dir),
                            AutoTokenizer.from_pretrained(out_dir))
    return _loaded[version]


def prompt_ids(tokenizer, text: str = PROMPT) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt").input_ids


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_auto_classes_pick_this_package_classes(version, converted):
    checkpoint, _, model, tokenizer = converted
    expected = Rwkv4WorldForCausalLM if checkpoint.version == "4" else Rwkv5WorldForCausalLM
    assert type(model) is expected
    assert type(tokenizer).__name__ == "RwkvWorldTokenizer"
    assert model.config.model_type == ("rwkv" if checkpoint.version == "4" else "rwkv5_world")


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_logits_equal_reference(version, converted):
    checkpoint, _, model, tokenizer = converted
    ids = prompt_ids(tokenizer)
    expected, _ = reference_logits(checkpoint.oracle_pth, ids[0].tolist())
    logits = model(ids).logits[0]
    assert logits.shape == expected.shape
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_greedy_generation_equals_reference(version, converted):
    checkpoint, _, model, tokenizer = converted
    ids = prompt_ids(tokenizer)
    output = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert output[0, :ids.shape[1]].tolist() == ids[0].tolist()
    assert output[0, ids.shape[1]:].tolist() == reference_greedy(checkpoint.oracle_pth, ids[0].tolist(), 12)


@pytest.mark.parametrize("version", ONE_VERSION)
def test_sampling_is_seeded_and_stays_in_the_top_p_set(version, converted):
    _, _, model, tokenizer = converted
    ids = prompt_ids(tokenizer)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(model.generate(ids, max_new_tokens=6, do_sample=True, top_p=0.5, temperature=1.0))
    assert torch.equal(runs[0], runs[1])
    first = runs[0][0, ids.shape[1]].item()
    probs = torch.softmax(model(ids).logits[0, -1], dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    allowed = order[: int((sorted_probs.cumsum(0) < 0.5).sum()) + 1].tolist()
    assert first in allowed


@pytest.mark.parametrize("version", ONE_VERSION)
def test_outputs_carry_the_cache_under_the_current_transformers_name(version, converted):
    model = converted[2]
    out = model(torch.tensor([[1, 2, 3]]))
    assert isinstance(out[CACHE_NAME], RwkvCache) and out[CACHE_NAME].get_seq_length() == 3
    assert out[CACHE_NAME].state is out.state
    assert CACHE_NAME in out.keys() and "past_key_values" in out  # the old name still reads it


@pytest.mark.parametrize("keyword", CACHE_KEYWORDS)
@pytest.mark.parametrize("version", ONE_VERSION)
def test_forward_takes_the_cache_under_either_name(version, keyword, converted):
    model = converted[2]
    first, second = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[9, 10]])
    carried = model(second, **{keyword: model(first)[CACHE_NAME]})
    whole = model(torch.cat([first, second], dim=1))
    torch.testing.assert_close(carried.logits[0], whole.logits[0, -2:], atol=1e-4, rtol=1e-4)
    assert carried[CACHE_NAME].get_seq_length() == 6
    cache = model(first)[CACHE_NAME]
    with pytest.raises(ValueError, match="cache once"):
        model(second, cache=cache, past_key_values=cache)


@pytest.mark.parametrize("keyword", CACHE_KEYWORDS)
@pytest.mark.parametrize("version", STATE_LAYOUTS + ["6", "7"])  # RWKV-6/7 hold v5's layout, through other math
def test_new_prompt_on_top_of_a_returned_state(version, keyword, converted):
    _, _, model, tokenizer = converted
    first = prompt_ids(tokenizer)
    out = model.generate(first, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    cache = out[CACHE_NAME]
    assert isinstance(cache, RwkvCache) and cache.get_seq_length() == out.sequences.shape[1] - 1
    before = cache.state.clone()
    more = prompt_ids(tokenizer, "\n\nQuestion: And of Italy?\n\nAnswer:")
    whole = torch.cat([out.sequences, more], dim=1)
    continued = model.generate(whole, **{keyword: cache}, max_new_tokens=6, do_sample=False)
    from_scratch = model.generate(whole, max_new_tokens=6, do_sample=False)
    assert torch.equal(continued, from_scratch)
    assert cache.state.equal(before)  # the cache handed in is not changed


@pytest.mark.parametrize("version", STATE_LAYOUTS)
def test_generate_from_a_state_reads_only_the_new_tokens(version, converted):
    _, _, model, tokenizer = converted
    preamble, question = prompt_ids(tokenizer, "You are helpful.\n\n"), prompt_ids(tokenizer)
    state = model(preamble).state
    on_state = model.generate(question, **{CACHE_NAME: RwkvCache(state)}, max_new_tokens=6, do_sample=False)
    whole = torch.cat([preamble, question], dim=1)
    from_scratch = model.generate(whole, max_new_tokens=6, do_sample=False)
    assert on_state[0, question.shape[1]:].tolist() == from_scratch[0, whole.shape[1]:].tolist()
    by_generate_kwarg = model.generate(question, state=state, max_new_tokens=6, do_sample=False)
    assert torch.equal(by_generate_kwarg, on_state)
    by_state_kwarg = model(question, state=state).logits
    torch.testing.assert_close(by_state_kwarg[0], model(whole).logits[0, preamble.shape[1]:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("version", ONE_VERSION)
def test_a_shorter_input_than_the_cache_is_refused(version, converted):
    _, _, model, tokenizer = converted
    ids = prompt_ids(tokenizer)
    cache = model(ids)[CACHE_NAME]
    with pytest.raises(ValueError, match="already read"):
        model.generate(ids[:, :3], **{CACHE_NAME: cache}, max_new_tokens=2)


@pytest.mark.parametrize("version", ONE_VERSION)
def test_padded_batch_generates_like_single_prompts(version, converted):
    _, _, model, tokenizer = converted
    texts = [PROMPT, "Hi"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    assert batch.input_ids[1, 0].item() == 0 and batch.attention_mask[1, 0].item() == 0  # left padding, id 0
    output = model.generate(**batch, max_new_tokens=5, do_sample=False)
    for row, text in enumerate(texts):
        single = model.generate(prompt_ids(tokenizer, text), max_new_tokens=5, do_sample=False)
        assert output[row, -5:].tolist() == single[0, -5:].tolist()


@pytest.mark.parametrize("version", ONE_VERSION)
def test_labels_give_the_shifted_cross_entropy(version, converted):
    _, _, model, tokenizer = converted
    ids = prompt_ids(tokenizer)
    out = model(ids, labels=ids)
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1], ids[0, 1:])
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("version", ONE_VERSION)
def test_beam_search_scores_match_the_sequence_log_probability(version, converted):
    _, _, model, tokenizer = converted
    ids = prompt_ids(tokenizer)
    out = model.generate(ids, max_new_tokens=4, num_beams=3, do_sample=False, length_penalty=0.0,
                         return_dict_in_generate=True, output_scores=True, early_stopping=True)
    sequence = out.sequences[0]
    log_probs = torch.log_softmax(model(sequence[None]).logits[0, :-1], dim=-1)
    new = range(ids.shape[1] - 1, sequence.shape[0] - 1)
    total = sum(log_probs[position, sequence[position + 1]].item() for position in new)
    assert out.sequences_scores[0].item() == pytest.approx(total, abs=1e-3)


@pytest.mark.parametrize("version", STATE_LAYOUTS)
def test_save_pretrained_round_trip(version, converted, tmp_path):
    _, out_dir, model, tokenizer = converted
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    original = model.state_dict()
    assert sorted(reloaded.state_dict()) == sorted(original)
    for key, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, original[key]), key
    assert (tmp_path / "rwkv_vocab_v20230424.txt").is_file()
    ids = prompt_ids(AutoTokenizer.from_pretrained(tmp_path))
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("version", ONE_VERSION)
def test_device_map_auto_places_the_model(version, converted):
    checkpoint, out_dir, model, tokenizer = converted
    placed = AutoModelForCausalLM.from_pretrained(out_dir, device_map="auto")
    expected_device = "cuda" if torch.cuda.is_available() else "cpu"
    assert {param.device.type for param in placed.parameters()} == {expected_device}
    ids = prompt_ids(tokenizer)
    torch.testing.assert_close(placed(ids).logits.cpu(), model(ids).logits, atol=1e-4, rtol=1e-4)
    generated = placed.generate(ids, max_new_tokens=4, do_sample=False)  # CPU input, model on its device
    assert generated.cpu().tolist() == model.generate(ids, max_new_tokens=4, do_sample=False).tolist()


def test_bf16_directory_keeps_norms_and_decays_in_fp32(checkpoint_factory):
    checkpoint, out_dir = converted_dir(checkpoint_factory, "5.2", dtype="bf16")
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    params = dict(model.named_parameters())
    assert params["rwkv.blocks.0.attention.key.weight"].dtype == torch.bfloat16
    assert params["head.weight"].dtype == torch.bfloat16
    for name in ("rwkv.blocks.0.attention.time_decay", "rwkv.blocks.0.ln1.weight", "rwkv.blocks.0.pre_ln.weight",
                 "rwkv.blocks.1.attention.ln_x.weight", "rwkv.ln_out.weight"):
        assert params[name].dtype == torch.float32, name
    ids = torch.tensor([[1, 2, 3, 500, 9000]])
    logits = model(ids).logits[0]
    # the plain bf16 path rounds activations to bf16 as the HF model does (the CPU fast path keeps them fp32)
    same_math, _ = load_model(checkpoint.path, device="cpu", dtype=torch.bfloat16, fast=False).forward(
        ids[0], all_logits=True)
    torch.testing.assert_close(logits, same_math, atol=1e-4, rtol=1e-4)
    expected, _ = reference_logits(checkpoint.oracle_pth, ids[0].tolist())
    torch.testing.assert_close(logits, expected, atol=0.5, rtol=0.05)  # bf16 projections vs fp32


def test_plain_transformers_reads_the_rwkv4_directory(checkpoint_factory):
    from transformers import RwkvForCausalLM

    checkpoint, out_dir = converted_dir(checkpoint_factory, "4")
    plain = RwkvForCausalLM.from_pretrained(out_dir).eval()
    ids = torch.tensor([[1, 2, 3, 500, 9000, 33]])
    with torch.no_grad():
        logits = plain(ids).logits[0]
    expected, _ = reference_logits(checkpoint.oracle_pth, ids[0].tolist())
    # transformers rescales activations every 6 layers even in fp32 (LayerNorm eps makes that inexact)
    torch.testing.assert_close(logits, expected, atol=1e-3, rtol=1e-3)


def test_from_config_builds_a_finite_random_model():
    from rwkv_chat.hf.config import Rwkv5WorldConfig

    config = Rwkv5WorldConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=1)
    model = AutoModelForCausalLM.from_config(config)
    assert type(model) is Rwkv5WorldForCausalLM
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
