"""`python -m rwkv_chat`: a real process, driven through stdin like a person at a terminal."""

from __future__ import annotations

import re
import subprocess
import sys

from rwkv_chat.serving.session import ChatSession
from rwkv_chat.tokenizer import WorldTokenizer


def chat(model_path, lines: list[str], *flags: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "rwkv_chat", "--model", str(model_path), "--max-new-tokens", "6",
         "--seed", "0", "--stats", *flags],
        input="".join(line + "\n" for line in lines), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def prefills(output: str) -> list[int]:
    return [int(n) for n in re.findall(r"\[prefill (\d+) tok · ", output)]


def test_turns_carry_the_state_and_retry_undo_reset_work(tiny_pth):
    tokenizer = WorldTokenizer()
    output = chat(tiny_pth.path, ["Hello", "How are you?", "/retry", "/undo", "/reset", "Hello", "/quit"])
    first = len(ChatSession().prompt_ids(tokenizer, "Hello"))
    second = len(tokenizer.encode("\n\nQuestion: How are you?\n\nAnswer:"))
    # the second turn can start with "\n" only if the first answer ended with one; tolerate both
    assert prefills(output)[0] == first and prefills(output)[1] in (second, second - 1)
    assert prefills(output)[2] == 0  # retry reads nothing new
    assert prefills(output)[3] == 0  # after /reset, "Hello" again: its state is cached
    assert "[1 turns left]" in output and "[new conversation]" in output
    answers = re.findall(r"Answer: (.*)\n\[prefill", output)
    assert answers[0] == answers[3]  # same seed, same state: same answer


def test_help_lists_the_commands_and_bad_model_fails_cleanly(make_checkpoint, tmp_path):
    output = chat(make_checkpoint("5.2").path, ["/help"])
    for command in ("/reset", "/retry", "/undo", "/help", "/quit"):
        assert command in output
    result = subprocess.run([sys.executable, "-m", "rwkv_chat", "--model", str(tmp_path / "missing.pth")],
                            capture_output=True, text=True, timeout=120, input="")
    assert result.returncode == 2 and "error: cannot load" in result.stderr


def test_a_g1_model_gets_its_familys_template_and_thinking(tmp_path):
    from checkpoints import make_state_dict, save_pth
    tokenizer = WorldTokenizer()
    path = save_pth(make_state_dict("7", n_layer=2, n_embd=128, seed=4), tmp_path / "rwkv7-g1x-tiny.pth")
    output = chat(path, ["Hello", "/quit"])
    assert "User: " in output and "Assistant: " in output
    assert prefills(output) == [len(tokenizer.encode("User: Hello\n\nAssistant: <think></think"))]
    output = chat(path, ["Hello", "/quit"], "--think", "think")
    assert prefills(output) == [len(tokenizer.encode("User: Hello\n\nAssistant: <think"))]
    assert "[thinking] " in output  # random weights never close the tag: all they write is reasoning
