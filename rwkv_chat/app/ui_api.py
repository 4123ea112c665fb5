"""The chat app's named API endpoints for gradio_client: chat, retry, edit (streaming), undo, reset, history,
conversation_id, resume, export_conversation, import_conversation, delete_conversation, list_models,
select_model; `stop` is the page's stop button itself (see ui.py).

Promises: the endpoints share the page's per-session gr.State, so one gradio_client `Client` is one
conversation, apart from every other client and browser tab; their settings arguments are the page's own
setting components (same bounds, same defaults). Every model name is checked against the server's choices.
Refusals raise gr.Error (an AppError for the client) with the reason, and change nothing.
Each turn's end saves the conversation (chat_service, conversation_store): `conversation_id` tells a client its id,
`resume` continues a saved one in this client (also after a server restart), export/import move one as JSON.
Documented for users in the README's API section.
"""

from __future__ import annotations

import gradio as gr

from ..loading.loader import ModelLoadError, resolve_device_dtype
from .chat_service import ChatSettings, Conversation, SessionControl
from .conversation_codec import parsed, to_json
from .setting_inputs import setting_number
from .model_choices import describe, free_memory
from .threaded_stream import threaded
from .ui_stream import reason


class ChatApi:
    def __init__(self, page):
        self.page = page
        self.service = page.service

    def wire(self) -> None:
        """Hidden outputs and one hidden trigger; each endpoint is a named listener on it."""
        page = self.page
        with gr.Row(visible=False):
            trigger = gr.Button("api")
            api_answer = gr.Textbox(label="answer")
            api_stats = gr.Textbox(label="stats")
            api_text = gr.Textbox(label="text")
            api_turn = setting_number(label="turn_index", value=0, setting="turn_index")  # 0.5 is refused, not made 0
            api_json = gr.JSON(label="result")
            api_model = gr.Textbox(label="model")  # not the picker: its own check would hide why a name is refused
            api_id = gr.Textbox(label="conversation_id")
            api_import = gr.JSON(label="conversation")
        state = [page.conversation, page.control]
        answer = [api_answer, api_stats, page.conversation]
        generating = dict(concurrency_id="generate", concurrency_limit=page.config.concurrency)
        quick = dict(concurrency_limit=None)
        click = trigger.click
        click(self.chat, [page.message] + page.settings + state, answer, api_name="chat", **generating)
        click(self.retry, page.settings + state, answer, api_name="retry", **generating)
        click(self.edit, [api_turn, page.message] + page.settings + state, answer, api_name="edit", **generating)
        click(self.undo, state, [api_text, page.conversation], api_name="undo", **quick)
        click(self.reset, state, [api_text, page.conversation], api_name="reset", **quick)
        click(self.history, [page.conversation], [api_json], api_name="history", **quick)
        click(self.list_models, [page.device, page.dtype], [api_json], api_name="list_models", **quick)
        click(self.conversation_id, [page.conversation], [api_text, page.conversation], api_name="conversation_id",
              **quick)
        click(self.resume, [api_id] + state, [api_json, page.conversation], api_name="resume", **quick)
        click(self.export_conversation, [page.conversation], [api_json], api_name="export_conversation", **quick)
        click(self.import_conversation, [api_import] + state, [api_json, page.conversation],
              api_name="import_conversation", **quick)
        click(self.delete_conversation, state, [api_text, page.conversation], api_name="delete_conversation",
              **quick)
        click(self.select_model, [api_model, page.device, page.dtype] + state, [api_text, page.conversation],
              api_name="select_model", concurrency_id="load", concurrency_limit=2)

    async def _stream(self, start, control: SessionControl):
        """(answer so far, stats line, conversation) per update; the stats line comes with the last one. A G1
        model's reasoning is never part of the answer: `history` returns it, beside the answer. The generation
        runs in a thread of its own (threaded_stream), so a waiting stream holds none of Gradio's."""
        async for update in threaded(lambda: self._updates(start, control)):
            yield update

    def _updates(self, start, control: SessionControl):
        updates = None
        try:
            with control.generating() as stop:
                updates = start(stop)
                for update in self.page.pace.throttled(updates):
                    if update.done:
                        notice = f"[{update.notice}] " if update.notice else ""
                        yield update.answer, notice + update.conversation.stats, update.conversation
                    else:
                        yield update.answer, "", gr.skip()
        except Exception as error:  # noqa: BLE001 - reported to the client; the conversation stays as it was
            raise gr.Error(reason(error), print_exception=False) from None
        finally:
            if updates is not None:
                updates.close()

    async def chat(self, message: str, max_new_tokens: float, temperature: float, top_p: float, top_k: float,
             presence_penalty: float, frequency_penalty: float, penalty_decay: float, prompt_style: str,
             preamble: str, seed: float, think: str, start_state: str, conversation: Conversation,
             control: SessionControl):
        """Send `message` as the next turn of this client's conversation; streams (answer, stats)."""
        settings = ChatSettings(max_new_tokens, temperature, top_p, top_k, presence_penalty, frequency_penalty,
                                penalty_decay, prompt_style, preamble, seed, think, start_state)
        async for update in self._stream(lambda stop: self.service.reply(conversation, message, settings, stop),
                                         control):
            yield update

    async def retry(self, max_new_tokens: float, temperature: float, top_p: float, top_k: float,
              presence_penalty: float, frequency_penalty: float, penalty_decay: float, prompt_style: str,
              preamble: str, seed: float, think: str, start_state: str, conversation: Conversation,
             control: SessionControl):
        """Answer the last message again, from the state right after it; streams (answer, stats)."""
        settings = ChatSettings(max_new_tokens, temperature, top_p, top_k, presence_penalty, frequency_penalty,
                                penalty_decay, prompt_style, preamble, seed, think, start_state)
        async for update in self._stream(lambda stop: self.service.retry(conversation, settings, stop), control):
            yield update

    async def edit(self, turn_index: float, message: str, max_new_tokens: float, temperature: float, top_p: float,
             top_k: float, presence_penalty: float, frequency_penalty: float, penalty_decay: float,
             prompt_style: str, preamble: str, seed: float, think: str, start_state: str,
             conversation: Conversation, control: SessionControl):
        """Replace user message `turn_index` (0 = first), drop what followed, answer it; streams (answer, stats)."""
        settings = ChatSettings(max_new_tokens, temperature, top_p, top_k, presence_penalty, frequency_penalty,
                                penalty_decay, prompt_style, preamble, seed, think, start_state)
        async for update in self._stream(
                lambda stop: self.service.edit(conversation, turn_index, message, settings, stop), control):
            yield update

    def undo(self, conversation: Conversation, control: SessionControl):
        """Forget the last turn; returns its message."""
        if control.busy:
            raise gr.Error("press Stop before undoing: an answer is still being written", print_exception=False)
        conversation, message = self.service.undo(conversation)
        return message, conversation

    def reset(self, conversation: Conversation, control: SessionControl):
        """Start a new conversation with the same model; returns the model's status line."""
        if control.busy:
            raise gr.Error("press Stop before resetting: an answer is still being written", print_exception=False)
        conversation = self.service.cleared(conversation)
        return self.page.status(conversation), conversation

    @staticmethod
    def history(conversation: Conversation):
        """The conversation as [[message, answer], ...]; a turn with thinking adds its reasoning as a third item."""
        return conversation.history()

    def conversation_id(self, conversation: Conversation):
        """This client's conversation id (to resume it later, from this or another client, even after a restart)."""
        conversation = self.service.identified(conversation)
        return conversation.id, conversation

    def resume(self, conversation_id: str, conversation: Conversation, control: SessionControl):
        """Continue the saved conversation `conversation_id` in this client; returns its history."""
        self._idle(control, "resuming")
        try:
            resumed = self.service.resume(conversation_id, self.page.default_key)
        except ValueError as error:
            raise gr.Error(str(error), print_exception=False) from None
        return resumed.history(), resumed

    def export_conversation(self, conversation: Conversation):
        """This client's conversation as JSON (messages, settings, model and the exact token ids)."""
        return to_json(self.service.identified(conversation))

    def import_conversation(self, exported, conversation: Conversation, control: SessionControl):
        """Continue an exported conversation (export_conversation's JSON) as a new one, with this client's model;
        returns its history."""
        self._idle(control, "importing")
        try:
            imported = self.service.imported(parsed(exported), conversation.model)
        except ValueError as error:
            raise gr.Error(f"not imported: {error}", print_exception=False) from None
        return imported.history(), imported

    def delete_conversation(self, conversation: Conversation, control: SessionControl):
        """Delete this client's conversation (the saved copy too) and start a new one; returns the new id."""
        self._idle(control, "deleting")
        conversation = self.service.identified(self.service.delete(conversation))
        return conversation.id, conversation

    @staticmethod
    def _idle(control: SessionControl, doing: str) -> None:
        if control.busy:
            raise gr.Error(f"press Stop before {doing}: an answer is still being written", print_exception=False)

    def list_models(self, device: str, dtype: str):
        """Every model the server offers, with sizes and whether it fits the chosen device and precision."""
        rows = []
        for choice in self.page.choices:
            try:
                placed_on, placed_as = resolve_device_dtype(device, dtype)
                need = choice.memory_bytes(placed_as)
                free = free_memory(placed_on)[0] + self.page.pool.reclaimable_bytes(str(placed_on))
                fits = None if need is None else need <= free
            except ModelLoadError:
                need, fits = None, False
            loaded = [f"{k.device} {k.dtype}" for k in self.page.pool.loaded_keys() if k.choice == choice.value]
            rows.append({"name": choice.value, "download_bytes": choice.download_bytes, "memory_bytes": need,
                         "fits": fits, "loaded": loaded, "label": describe(choice, device, dtype)})
        return rows

    def select_model(self, model: str, device: str, dtype: str, conversation: Conversation,
                     control: SessionControl):
        """Load `model` (a name from list_models) and start a new conversation with it."""
        try:
            conversation = self.page.switch_model(model, device, dtype, conversation, control, None)
        except Exception as error:  # noqa: BLE001 - reported to the client; the session keeps its model
            raise gr.Error(reason(error), print_exception=False) from None
        return self.page.status(conversation), conversation

