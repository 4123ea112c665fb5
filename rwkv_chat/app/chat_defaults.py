"""The chat settings a model family was made for: prompt style, thinking mode and sampling.

Promises: `defaults_for(choice)` gives the `ChatSettings` the page and the terminal start from for a model:
- RWKV-7 G1 (the reasoning chat models): `User:/Assistant:`, thinking "fake think" (the prompt ends
  " <think></think": a direct answer, the form BlinkDL's G1 chat demo uses), and that demo's sampling: temperature
  1.0, top-p 0.3, presence and frequency penalties 0.5, decay 0.996. `THINKING_SAMPLING` is his thinking demo's
  (top-p 0.5, top-k 100, no penalties, decay 0.997), which the page applies when "think" is chosen.
- Every World model (RWKV-4/5/6/7 World, and files of unknown family): `Question:/Answer:`, no thinking, the
  package's sampling defaults.
A model is G1 when it is a catalog G1 entry or its file or repo name says "g1" (e.g. rwkv7-g1a-…).
Knows nothing of Gradio or of loading.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import PurePath
from typing import Optional

from ..prompts import QUESTION_ANSWER, USER_ASSISTANT
from .chat_service import ChatSettings
from .model_choices import ModelChoice

G1_SAMPLING = dict(temperature=1.0, top_p=0.3, top_k=0, presence_penalty=0.5, frequency_penalty=0.5,
                   penalty_decay=0.996)
THINKING_SAMPLING = dict(temperature=1.0, top_p=0.5, top_k=100, presence_penalty=0.0, frequency_penalty=0.0,
                         penalty_decay=0.997)
_G1_NAME = re.compile(r"(?:^|[^a-z0-9])g1[a-z]?(?:[^a-z0-9]|$)")


def is_g1(choice: ModelChoice) -> bool:
    if choice.entry is not None:
        return choice.entry.name.startswith("RWKV-7 G1")
    return bool(_G1_NAME.search(PurePath(choice.source).name.lower()))


def defaults_for(choice: ModelChoice, preamble: Optional[str] = None) -> ChatSettings:
    if is_g1(choice):
        return ChatSettings(prompt_style=USER_ASSISTANT.name, preamble=preamble, think="fake think", **G1_SAMPLING)
    return ChatSettings(prompt_style=QUESTION_ANSWER.name, preamble=preamble)


def with_think(settings: ChatSettings, think: str) -> ChatSettings:
    """`settings` with thinking mode `think`, and the sampling that mode is used with on a G1 model."""
    sampling = THINKING_SAMPLING if think == "think" else G1_SAMPLING
    return replace(settings, think=think, **sampling)
