"""The classic ChatRWKV LAMBADA check: perplexity and accuracy of a text's last word.

    python -m benchmarks.eval_lambada --model SOURCE --data lambada_test.jsonl [--device cpu] [--dtype fp32]

Semantics follow ChatRWKV's check (BlinkDL/ChatRWKV, the script BBuf/RWKV-World-HF-Tokenizer keeps as
check_lambda/lambda_pt.py), exactly:
- each jsonl line is {"text": ...}; it is split at its last space: context = the text before it, target =
  " " + the last word; context and target are tokenized separately (no prefix, no padding token);
- the model reads context + target at once; for each target token, its log-probability is read from the
  logits of the position before it; a sample is correct when every target token is the argmax;
- ppl = exp(-(sum over samples of the target's total log-probability) / samples), i.e. per sample, not per
  token; acc = correct samples / samples * 100;
- a line `N ppl P acc A` (both rounded to 2 decimals) every 100 samples and after the last one.
Reference numbers printed by that script: RWKV-4 World 0.1B, 5153 samples: ppl 26.16, acc 35.88.

SOURCE is anything `load_model` reads (.pth, transformers directory, catalog name, hub id).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

REPORT_EVERY = 100


@dataclass(frozen=True)
class LambadaSample:
    context: str
    target: str  # " " + last word


@dataclass(frozen=True)
class LambadaResult:
    samples: int
    log_prob_sum: float  # sum over samples of the target's log-probability
    correct: int

    @property
    def ppl(self) -> float:
        return math.exp(-self.log_prob_sum / self.samples)

    @property
    def acc(self) -> float:
        return self.correct / self.samples * 100

    def line(self) -> str:
        return f"{self.samples} ppl {round(self.ppl, 2)} acc {round(self.acc, 2)}"


def split_text(text: str) -> LambadaSample:
    """Context and target of one LAMBADA text (split at the last space)."""
    context, space, word = text.rpartition(" ")
    if not space or not context or not word:
        raise ValueError(f"a LAMBADA text needs a context and a last word separated by a space: {text!r}")
    return LambadaSample(context, " " + word)


def read_samples(path: str | Path) -> list[LambadaSample]:
    samples = []
    with open(path, encoding="utf-8") as file:
        for line_no, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                samples.append(split_text(json.loads(line)["text"]))
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{path}:{line_no}: {error}") from error
    return samples


def score_sample(model, tokenizer, sample: LambadaSample) -> tuple[float, bool]:
    """(log-probability of the target, whether every target token is the greedy choice)."""
    context = tokenizer.encode(sample.context)
    target = tokenizer.encode(sample.target)
    logits, _ = model.forward(context + target, None, all_logits=True)  # [T, V]
    predicting = logits[len(context) - 1:len(context) - 1 + len(target)].float()  # rows that predict the target
    log_probs = torch.log_softmax(predicting, dim=-1)
    wanted = torch.tensor(target, device=log_probs.device)
    total = float(log_probs.gather(1, wanted[:, None]).double().sum())
    correct = bool((predicting.argmax(dim=-1) == wanted).all())
    return total, correct


def evaluate(model, tokenizer, samples: Iterable[LambadaSample], report: Callable[[str], None] = print,
             every: int = REPORT_EVERY) -> LambadaResult:
    """Score every sample, reporting the running result every `every` samples and at the end."""
    samples = list(samples)
    if not samples:
        raise ValueError("no LAMBADA samples to evaluate")
    result = LambadaResult(0, 0.0, 0)
    for sample in samples:
        log_prob, correct = score_sample(model, tokenizer, sample)
        result = LambadaResult(result.samples + 1, result.log_prob_sum + log_prob, result.correct + correct)
        if result.samples % every == 0 or result.samples == len(samples):
            report(result.line())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.eval_lambada",
                                     description="LAMBADA perplexity and accuracy (ChatRWKV's check)")
    parser.add_argument("--model", required=True, help=".pth, transformers directory, catalog name or hub id")
    parser.add_argument("--data", required=True, help="jsonl file, one {\"text\": ...} per line")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="fp32", help="fp32 (as the reference check), bf16 or fp16")
    parser.add_argument("--limit", type=int, default=None, help="only the first N samples")
    args = parser.parse_args(argv)

    from rwkv_chat.loading.loader import ModelLoadError, load_model
    from rwkv_chat.tokenizer import WorldTokenizer

    try:
        samples = read_samples(args.data)[:args.limit]
        model = load_model(args.model, device=args.device, dtype=args.dtype,
                           progress=lambda message: print(message, file=sys.stderr))
    except (ModelLoadError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    evaluate(model, WorldTokenizer(), samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
