"""Terminal chat: `python -m rwkv_chat --model SOURCE` (or the installed `rwkv-chat-terminal`).

Streams answers to `Question: …\\n\\nAnswer:` prompts and carries the RNN state across turns, so each turn
reads only its own new tokens. Commands (type them as a message):

  /reset   start a new conversation (the preamble, if any, is kept)
  /retry   answer the last question again, from the state right after it
  /undo    forget the last question and its answer
  /help    show these commands
  /quit    leave (Ctrl-D and Ctrl-C work too)
"""

from __future__ import annotations

import argparse
import sys
import threading

from .. import limits
from ..loading.catalog import DEFAULT_MODEL
from ..loading.loader import ModelLoadError, dtype_name, load_model
from ..prompts import TEMPLATES, DEFAULT_TEMPLATE
from ..serving.engine import ChatEngine, GenerationSettings
from ..serving.sampling import SamplingParams
from ..serving.session import ChatSession
from ..tokenizer import WorldTokenizer

COMMANDS = {"/reset": "start a new conversation", "/retry": "answer the last question again",
            "/undo": "forget the last question and answer", "/help": "show the commands", "/quit": "leave"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rwkv_chat", description="Chat with an RWKV model in the terminal.")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="catalog name, hub repo id, .pth file or HF directory")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default="auto", help="auto, fp32, bf16 or fp16")
    parser.add_argument("--template", default=DEFAULT_TEMPLATE, choices=sorted(TEMPLATES))
    parser.add_argument("--preamble", default=None, help="system text placed before the conversation")
    parser.add_argument("--max-new-tokens", type=int, default=limits.DEFAULT_NEW_TOKENS)
    parser.add_argument("--temperature", type=float, default=SamplingParams.temperature)
    parser.add_argument("--top-p", type=float, default=SamplingParams.top_p)
    parser.add_argument("--top-k", type=int, default=SamplingParams.top_k)
    parser.add_argument("--presence-penalty", type=float, default=SamplingParams.presence_penalty)
    parser.add_argument("--frequency-penalty", type=float, default=SamplingParams.frequency_penalty)
    parser.add_argument("--penalty-decay", type=float, default=SamplingParams.penalty_decay)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stats", action="store_true", help="print a stats line after each answer")
    return parser.parse_args(argv)


def settings_from(args) -> GenerationSettings:
    sampling = SamplingParams(args.temperature, args.top_p, args.top_k, args.presence_penalty,
                              args.frequency_penalty, args.penalty_decay)
    return GenerationSettings(sampling, args.max_new_tokens, args.seed)


def stream_answer(chunks, out) -> ChatSession | None:
    """Print an answer as it streams; return the new session (None if it was interrupted)."""
    shown = ""
    try:
        for chunk in chunks:
            out.write(chunk.text[len(shown):] if chunk.text.startswith(shown) else "\n" + chunk.text)
            out.flush()
            shown = chunk.text
            if chunk.done:
                out.write("\n")
                return chunk
    except KeyboardInterrupt:
        out.write("\n[interrupted]\n")
    return None


def chat_loop(engine: ChatEngine, session: ChatSession, settings: GenerationSettings, show_stats: bool,
              read=input, out=sys.stdout) -> None:
    fresh = session
    out.write("Type a message, or /help for commands.\n")
    while True:
        try:
            line = read("Question: ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        command = line.strip()
        if command == "/quit":
            return
        if command == "/help":
            out.write("".join(f"  {name:7} {what}\n" for name, what in COMMANDS.items()))
            continue
        if command == "/reset":
            session = fresh
            out.write("[new conversation]\n")
            continue
        if command == "/undo":
            session = session.truncated(max(0, len(session.turns) - 1))
            out.write(f"[{len(session.turns)} turns left]\n")
            continue
        try:
            if command == "/retry":
                chunks = engine.regenerate(session, settings, threading.Event())
            else:
                chunks = engine.reply(session, line, settings, threading.Event())
        except ValueError as error:
            out.write(f"[{error}]\n")
            continue
        out.write("Answer: ")
        final = stream_answer(chunks, out)
        if final is not None:
            session = final.session
            if show_stats:
                out.write(f"[{final.stats.line()}]\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        settings = settings_from(args)
        model = load_model(args.model, args.device, args.dtype, progress=lambda m: print(f"[{m}]", file=sys.stderr))
    except (ModelLoadError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    label = f"{args.model} · {model.device.type} {dtype_name(model.dtype)}"
    engine = ChatEngine(model, WorldTokenizer(), label=label)
    session = ChatSession(args.template, args.preamble)
    engine.warm_preamble(session)
    chat_loop(engine, session, settings, args.stats)
    return 0
