"""`python -m rwkv_chat.hf.convert` as a command, and `pipeline("text-generation")` on its output."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from hf_helpers import PROMPT, converted_dir, reference_greedy, register_hf

register_hf()

from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline  # noqa: E402

from rwkv_chat import load_model  # noqa: E402
from rwkv_chat.hf.convert import main  # noqa: E402


def test_convert_command_writes_a_sharded_bf16_directory(make_checkpoint, tmp_path):
    checkpoint = make_checkpoint("5.0", v50_time_first=True)  # time_first [H] becomes time_faaaa = exp()
    out_dir = tmp_path / "converted"
    result = subprocess.run([sys.executable, "-m", "rwkv_chat.hf.convert", str(checkpoint.path), str(out_dir),
                             "--dtype", "bf16", "--max-shard-size", "20MB"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    shards = sorted({name for name in index["weight_map"].values()})
    assert len(shards) >= 2 and all((out_dir / name).is_file() for name in shards)
    assert "rwkv.blocks.0.attention.time_faaaa" in index["weight_map"]
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "rwkv_vocab_v20230424.txt"):
        assert (out_dir / name).is_file(), name
    config = json.loads((out_dir / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["rwkv_version"] == "5.0"
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    ids = torch.tensor([[1, 2, 3, 500, 9000]])
    # the plain bf16 path: the HF model's math (the CPU fast path keeps its activations in fp32, more exact)
    expected, _ = load_model(checkpoint.path, device="cpu", dtype=torch.bfloat16, fast=False).forward(ids[0],
                                                                                                all_logits=True)
    torch.testing.assert_close(model(ids).logits[0], expected, atol=1e-4, rtol=1e-4)


def test_convert_reports_an_unreadable_source(tmp_path, capsys):
    missing = tmp_path / "missing.pth"
    assert main([str(missing), str(tmp_path / "out")]) == 1
    assert "missing.pth" in capsys.readouterr().err


def test_text_generation_pipeline_continues_like_the_reference(checkpoint_factory):
    checkpoint, out_dir = converted_dir(checkpoint_factory, "5.2")
    generator = pipeline("text-generation", model=str(out_dir), device="cpu")
    tokenizer = generator.tokenizer
    expected = reference_greedy(checkpoint.oracle_pth, tokenizer.encode(PROMPT), 8)
    result = generator(PROMPT, max_new_tokens=8, do_sample=False)
    assert result[0]["generated_text"] == PROMPT + tokenizer.decode(expected)


def test_chat_pipeline_answers_after_the_question_answer_template(checkpoint_factory):
    checkpoint, out_dir = converted_dir(checkpoint_factory, "4")
    generator = pipeline("text-generation", model=str(out_dir), device="cpu")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = generator(messages, max_new_tokens=6, do_sample=False)[0]["generated_text"][-1]
    prompt = "Question: What is the capital of France?\n\nAnswer:"
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    expected = tokenizer.decode(reference_greedy(checkpoint.oracle_pth, tokenizer.encode(prompt), 6))
    assert reply["role"] == "assistant"
    assert reply["content"] == expected
