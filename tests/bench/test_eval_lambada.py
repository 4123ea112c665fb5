"""`python -m benchmarks.eval_lambada` against an independent computation with the `rwkv` reference package
(the ChatRWKV LAMBADA script's own arithmetic: rwkv TRIE tokenizer, softmax, math.log)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hf_helpers import reference_model, reference_tokenizer

from rwkv_chat import load_model
from benchmarks.eval_lambada import evaluate, main, read_samples, split_text
from rwkv_chat.hf.tokenizer import load_vocabulary
from rwkv_chat.tokenizer import find_vocab_file

CONTEXTS = [
    "The quick brown fox jumps over the lazy dog and then runs to the",
    "She opened the door, looked around the empty room and whispered his",
    "After a long day at work, all he wanted was a cup of",
    "The ship sailed across the ocean for weeks before reaching the distant",
    "In the middle of the forest there was a small wooden",
]


def reference_check(pth, texts):
    """ChatRWKV's check_lambada loop, verbatim in spirit: (ppl, acc) over `texts`."""
    tokenizer = reference_tokenizer()
    model = reference_model(str(pth))
    xsum, xacc = 0.0, 0
    for text in texts:
        context, target = text.rsplit(" ", 1)[0], " " + text.rsplit(" ", 1)[1]
        src, dst = tokenizer.encode(context), tokenizer.encode(target)
        out, _ = model.forward(src + dst, None, full_output=True)
        correct = True
        for i in range(len(dst)):
            probs = torch.softmax(out[len(src) - 1 + i, :].float(), dim=-1)
            xsum += math.log(probs[dst[i]])
            correct &= torch.argmax(probs).item() == dst[i]
        xacc += correct
    return math.exp(-xsum / len(texts)), xacc / len(texts) * 100


def greedy_word_text(model, tokenizer, context):
    """context + " word" where " word" is one token the model predicts greedily (None if it does not)."""
    logits, _ = model.forward(tokenizer.encode(context))
    token = int(logits.argmax())
    piece = tokenizer.token_bytes(token)
    try:
        word = piece.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if word.startswith(" ") and len(word) > 1 and not any(c.isspace() for c in word[1:]):
        if tokenizer.encode(word) == [token]:
            return context + word
    return None


@pytest.fixture(scope="module")
def lambada_case(make_checkpoint, tmp_path_factory):
    checkpoint = make_checkpoint("4")
    model = load_model(checkpoint.path, device="cpu", dtype=torch.float32)
    tokenizer = load_vocabulary(find_vocab_file())[0]  # the WorldTokenizer the HF tests already parsed
    texts = [context + " end" for context in CONTEXTS[:3]]
    # a text the model gets right, so accuracy is not trivially 0
    for context in CONTEXTS + [f"Line {n}: the word after this is" for n in range(40)]:
        text = greedy_word_text(model, tokenizer, context)
        if text is not None:
            texts.append(text)
            break
    else:
        pytest.fail("no context found whose greedy next token is a whole word")
    data = tmp_path_factory.mktemp("lambada") / "lambada_test.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts), encoding="utf-8")
    return checkpoint, model, tokenizer, texts, data, reference_check(checkpoint.oracle_pth, texts)


def test_split_follows_the_reference():
    sample = split_text("a b  c word")
    assert (sample.context, sample.target) == ("a b  c", " word")
    with pytest.raises(ValueError):
        split_text("oneword")


def test_perplexity_and_accuracy_equal_the_reference_check(lambada_case):
    checkpoint, model, tokenizer, texts, data, (ppl, acc) = lambada_case
    lines = []
    result = evaluate(model, tokenizer, read_samples(data), report=lines.append, every=2)
    assert result.samples == len(texts)
    assert result.ppl == pytest.approx(ppl, rel=1e-4)
    assert result.acc == pytest.approx(acc) and 0 < result.acc < 100
    counts = [*range(2, len(texts) + 1, 2)] + ([len(texts)] if len(texts) % 2 else [])
    assert [line.split(" ppl ")[0] for line in lines] == [str(count) for count in counts]
    assert lines[-1] == f"{len(texts)} ppl {round(result.ppl, 2)} acc {round(result.acc, 2)}"


def test_command_prints_the_final_line(lambada_case, capsys):
    checkpoint, _, _, texts, data, (ppl, acc) = lambada_case
    assert main(["--model", str(checkpoint.path), "--data", str(data), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1  # fewer than 100 samples: only the final line
    count, _, printed_ppl, _, printed_acc = lines[0].split()
    assert int(count) == len(texts)
    assert float(printed_ppl) == pytest.approx(ppl, rel=1e-4) and float(printed_acc) == round(acc, 2)
