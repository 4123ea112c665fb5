"""Terminal chat: `python -m rwkv_chat --model SOURCE` (or the installed `rwkv-chat-terminal`).

Streams answers and carries the RNN state across turns, so each turn reads only its own new tokens. The prompt
style, thinking mode and sampling default to what the model's family was made for (app/chat_defaults.py: G1
models `User:/Assistant:` with thinking, World models `Question:/Answer:`); every flag overrides its part.
A G1 model's reasoning is printed in a `[thinking] …` block before the answer. Commands (type them as a message):

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
from dataclasses import replace

from ..loading.catalog import suggested_model
from ..loading.loader import ModelLoadError, dtype_name, load_model
from ..prompts import TEMPLATES, THINK_MODES, get_template
from ..serving.engine import ChatEngine, GenerationSettings
from ..serving.session import ChatSession
from ..tokenizer import WorldTokenizer
from .chat_defaults import defaults_for, with_think
from .chat_service import ChatSettings
from .config import gpu_memory
from .model_choices import operator_choice

COMMANDS = {"/reset": "start a new conversation", "/retry": "answer the last question again",
            "/undo": "forget the last question and answer", "/help": "show the commands", "/quit": "leave"}
SETTING_FLAGS = ("max_new_tokens", "temperature", "top_p", "top_k", "presence_penalty", "frequency_penalty",
                 "penalty_decay", "seed")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rwkv_chat", description="Chat with an RWKV model in the terminal.")
    parser.add_argument("--model", default=None, help="catalog name, hub repo id, .pth file or HF directory "
                                                      "(default: as the web app)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default="auto", help="auto, fp32, bf16, fp16, int8 or int4 (CPU)")
    parser.add_argument("--template", default=None, choices=sorted(TEMPLATES), help="default: the model family's")
    parser.add_argument("--think", default=None, choices=THINK_MODES, help="G1 thinking (default: the family's)")
    parser.add_argument("--preamble", default=None, help="system text placed before the conversation")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--presence-penalty", type=float, default=None)
    parser.add_argument("--frequency-penalty", type=float, default=None)
    parser.add_argument("--penalty-decay", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stats", action="store_true", help="print a stats line after each answer")
    return parser.parse_args(argv)


def settings_from(args) -> ChatSettings:
    """The family's defaults for the model, with every flag given on top (ValueError for bad values)."""
    settings = defaults_for(operator_choice(args.model), args.preamble)
    if args.think is not None:
        settings = with_think(settings, args.think) if settings.think != "off" else replace(settings, think=args.think)
    if args.template is not None:
        settings = replace(settings, prompt_style=args.template)
    given = {name: getattr(args, name) for name in SETTING_FLAGS if getattr(args, name) is not None}
    settings = replace(settings, **given)
    settings.generation()  # checks every value once, here
    return settings


def stream_answer(chunks, out) -> ChatSession | None:
    """Print an answer as it streams (its reasoning first, in a [thinking] block); return the new session
    (None if it was interrupted)."""
    shown_reasoning, shown = "", ""
    try:
        for chunk in chunks:
            if chunk.reasoning != shown_reasoning:
                if not shown_reasoning:
                    out.write("[thinking] ")
                fresh = chunk.reasoning[len(shown_reasoning):] if chunk.reasoning.startswith(shown_reasoning) \
                    else "\n" + chunk.reasoning
                out.write(fresh)
                shown_reasoning = chunk.reasoning
            if chunk.text != shown:
                if shown_reasoning and not shown:
                    out.write("\n[answer] ")
                out.write(chunk.text[len(shown):] if chunk.text.startswith(shown) else "\n" + chunk.text)
                shown = chunk.text
            out.flush()
            if chunk.done:
                out.write("\n")
                return chunk
    except KeyboardInterrupt:
        out.write("\n[interrupted]\n")
    return None


def chat_loop(engine: ChatEngine, session: ChatSession, settings: GenerationSettings, show_stats: bool,
              read=input, out=sys.stdout) -> None:
    fresh = session
    template = get_template(session.template)
    out.write("Type a message, or /help for commands.\n")
    while True:
        try:
            line = read(template.user_prefix)
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
        out.write(template.assistant_prefix + " ")
        final = stream_answer(chunks, out)
        if final is not None:
            session = final.session
            if show_stats:
                out.write(f"[{final.stats.line()}]\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    args.model = args.model or suggested_model(gpu_memory(args.device))
    try:
        settings = settings_from(args)
        model = load_model(args.model, args.device, args.dtype, progress=lambda m: print(f"[{m}]", file=sys.stderr))
    except (ModelLoadError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    label = f"{args.model} · {model.device.type} {dtype_name(model.dtype)}"
    engine = ChatEngine(model, WorldTokenizer(), label=label)
    template, preamble, _ = settings.session_style()
    session = ChatSession(template, preamble)
    engine.warm_preamble(session)
    chat_loop(engine, session, settings.generation(), args.stats)
    return 0
