"""The page's number settings (sliders and number boxes) as inputs that name themselves when refused.

Promises: `setting_slider(...)` and `setting_number(...)` are gr.Slider and gr.Number as the page shows them, but
what they receive (from the page, gradio_client or raw HTTP) is only checked to be a finite number: anything else
(text, null unless the box may be empty, true, NaN) is refused with gr.Error naming the setting, in the words of
chat_service.checked_number ("temperature must be a number, got 'abc'"). They neither clamp nor round: bounds and
whole-number rules are checked once, by ChatSettings and SamplingParams, so the page, gradio_client and the OpenAI
API refuse the same values with the same words.

(The check replaces the component's `preprocess` on the instance: a subclass of a Gradio component would make
Gradio write a type-stub file into this package at import time.)
"""

from __future__ import annotations

import gradio as gr

from .chat_service import checked_number


def setting_slider(*args, setting: str, **kwargs) -> gr.Slider:
    return _checked(gr.Slider(*args, **kwargs), setting, empty_allowed=False)


def setting_number(*args, setting: str, empty_allowed: bool = False, **kwargs) -> gr.Number:
    """empty_allowed: an empty box passes as None (the seed's "random")."""
    return _checked(gr.Number(*args, **kwargs), setting, empty_allowed)


def _checked(component, setting: str, empty_allowed: bool):
    def preprocess(payload):
        if payload is None and empty_allowed:
            return None
        try:
            return checked_number(setting, payload)
        except ValueError as error:
            raise gr.Error(str(error), print_exception=False) from None

    component.preprocess = preprocess
    return component
