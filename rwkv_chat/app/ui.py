"""The Gradio page and its API: `build_app(config)` returns the `gr.Blocks` demo; `launch(demo, config)`.

Promises:
- Each browser session (and each gradio_client `Client`) has its own `gr.State`: an immutable
  `Conversation` and a `SessionControl` (stop button + one generation at a time). No chat state lives in
  module globals; models are shared through one `ModelPool`, loaded in the handler's own worker thread
  (queue slot "load"), so other sessions keep chatting meanwhile.
- The page takes no files: Gradio's upload route refuses more than limits.MAX_UPLOAD_BYTES, and its temporary files
  are cleaned every hour and at every start.
- Refused input (too long, empty, settings out of bounds, unknown model) is reported with its message
  (a gr.Warning toast on the page; gr.Error, i.e. an AppError, for API clients) and changes nothing: the
  text stays in the box, the conversation is unchanged.
- A stop request keeps the partial answer; the state kept matches it. A client that goes away closes the
  generator, which ends the generation.
- The picker offers only `ModelChoices` (the operator's --model + the catalog models --models offers); every
  API argument naming a model is checked against it. Loads visitors start are rate-limited (--load-cooldown).
- Conversations persist (conversation_store, in --data-dir): each is saved when a turn ends; the tab keeps its
  conversation id in the browser (gr.BrowserState, encrypted with the store's own secret), so a reload or a server
  restart shows the chat again with its settings and the next turn continues it (the state is rebuilt from the
  saved tokens). The "Conversation" panel exports it as JSON, imports a pasted export, and deletes it.
- `serve` (the command line) drains on SIGTERM (draining.py): no new answers, running ones end within
  --drain-seconds or are stopped (kept), the store is flushed, and each step is logged. It also hands the
  heap's free pages back to the system every 30 s (process_memory.py), so RSS levels off once the state cache is
  full.
- Loading a model presets its family's chat settings (chat_defaults: template, thinking, sampling) and the start
  states that fit it; a G1 model's reasoning shows as a folded "Thinking" message above its answer.
Named API endpoints (gradio_client) are wired by ui_api.ChatApi, plus `stop` (the Stop button); all other
events are private to the page. `launch` also serves the OpenAI-compatible routes (openai_api.OpenAIApi) under
/v1 on the same server.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import fields, replace
from pathlib import Path

import gradio as gr

from .. import limits
from ..loading.loader import DTYPES, ModelLoadError, config_from_state_dict, read_pth, resolve_device_dtype
from ..loading.state_files import StateFileError, parse_state_specs
from ..prompts import TEMPLATES, THINK_MODES
from .chat_defaults import defaults_for, is_g1, with_think
from .chat_service import Busy, ChatService, ChatSettings, Conversation, SessionControl
from .config import DEVICE_CHOICES, DTYPE_CHOICES, AppConfig, parse_config
from .conversation_codec import parsed, to_json
from .conversation_store import STORE_FILE, ConversationStore, StoreError
from .draining import Admission, on_sigterm
from .display import user_text
from .engine_factory import EngineFactory, engine_process_count
from .model_choices import ModelChoices, ModelKey, ModelListError, describe
from .model_pool import LoadCooldown, LoadRefused, ModelPool, chat_capacity
from .openai_api import OpenAIApi
from .process_memory import TRIM_SECONDS, MemoryTrimmer
from .setting_inputs import setting_number, setting_slider
from .threaded_stream import threaded
from .ui_api import ChatApi
from .ui_stream import StreamPace, reason

TITLE = "RWKV chat"
INTRO = ("## RWKV chat\nAn RNN that carries its whole conversation in a fixed-size state: each turn reads "
         "only its own new tokens. Pick a model on the right (RWKV-7 G1 models can think before they answer); "
         "the answer streams below.")
DRAGON = ("In a shocking finding, scientist discovered a herd of dragons living in a remote, previously "
          "unexplored valley, in Tibet. Even more surprising to the researchers was the fact that the dragons "
          "spoke perfect Chinese.")
EXAMPLES = [[DRAGON], ["请介绍一下北京的旅游景点"], ["What are the three laws of robotics?"],
            ["Write a short poem about a cat watching the rain."]]
# the settings a model family presets (chat_defaults), as ChatSettings names; the page sets them on Load
FAMILY_FIELDS = ("temperature", "top_p", "top_k", "presence_penalty", "frequency_penalty", "penalty_decay",
                 "prompt_style", "think")
GRADIO_DEFAULT_THREADS = 40  # what Gradio runs at once unless told (starlette's thread pool)
BROWSER_KEY = "rwkv-chat-conversation"  # the browser's local storage entry that keeps the tab's conversation id
LOCAL_FILE_HINT = ("To use a file you already have, start the app with `python app.py --model "
                   "/path/to/RWKV-5-World-0.1B-v1-20230803-ctx4096.pth` (or set `RWKV_MODEL`).")


def build_app(config: AppConfig) -> gr.Blocks:
    """The whole app: model pool, conversation store, chat service, page; the default model starts loading in the
    background."""
    choices = ModelChoices(config.model, config.models, config.device, config.dtype)  # ModelListError: at start-up
    config = sized_config(config, choices)
    state_files = tuple(parse_state_specs(config.states))  # StateFileError: a clear message at start-up
    pool = ModelPool(choices, EngineFactory(choices, config.preamble, max_batch=config.concurrency,
                                            state_files=state_files, stats_every=config.stats_every,
                                            processes=config.engine_processes),
                     cooldown=LoadCooldown(config.load_cooldown))
    store = open_store(config)
    service = ChatService(pool, store, Admission())
    page = ChatPage(service, choices, config, tuple(f.name for f in state_files))
    page.preload_default()
    demo = page.build()
    # Gradio runs at most max_threads events at once whatever their concurrency limits (its queue's active jobs):
    # 40 unless told, which capped 128 streaming chats at 40 and queued the rest. The streams hold none of its
    # threads (threaded_stream), so the same number for its thread limiter only serves the events' processing.
    # queue() reads the attribute; launch() is given it again
    demo.max_threads = worker_threads(config)
    demo.queue(default_concurrency_limit=config.concurrency, max_size=config.max_queue)
    demo.rwkv_pool = pool  # for tests and for tools that embed the app
    demo.rwkv_service = service
    demo.rwkv_openai = OpenAIApi(pool, choices, config.device, config.dtype, config.api_key, config.max_queue,
                                 config.preamble, service.admission)
    return demo


def sized_config(config: AppConfig, choices: ModelChoices) -> AppConfig:
    """--concurrency / --max-queue "auto" settled from what the operator's model and the device hold
    (model_pool.chat_capacity, with as many engine processes as will serve that model), before the batcher and the
    queue are built; explicit values stay."""
    if config.concurrency is not None and config.max_queue is not None:
        return config
    processes = engine_process_count(choices.default, config.device, config.dtype, config.engine_processes)
    return config.sized(chat_capacity(choices.default, config.device, config.dtype, processes))


def open_store(config: AppConfig) -> ConversationStore:
    """The conversation store in config.data_dir (in memory when None); a directory that cannot be used is a
    start-up error (StoreError) that names it."""
    max_age = config.keep_days * 86_400 if config.keep_days else None
    if config.data_dir is None:
        return ConversationStore(None, max_age)
    path = Path(config.data_dir).expanduser() / STORE_FILE
    try:
        return ConversationStore(path, max_age)
    except (OSError, sqlite3.Error) as error:
        raise StoreError(f"cannot keep conversations in {path} (--data-dir): {error}") from None


def launch(demo: gr.Blocks, config: AppConfig, **kwargs):
    """Serve `demo` as `config` says (host, port, --share), with the OpenAI-compatible routes under /v1 on the
    same server. With --cors-origins the page is mounted in an app of ours whose CORS policy names those origins
    (Gradio then adds none of its own) and served by uvicorn; otherwise Gradio serves it with its own rules."""
    if not config.api_key and config.server_name not in ("127.0.0.1", "localhost", "::1"):
        print(f"rwkv-chat: the OpenAI-compatible API at /v1 is open to anyone who can reach "
              f"{config.server_name}:{config.port}, as the page is; set --api-key (or RWKV_API_KEY) to require a key",
              flush=True)
    routes = list(demo.rwkv_openai.router().routes)
    if config.cors_origins:
        return serve_with_cors(demo, config, routes)
    return demo.launch(server_name=config.server_name, server_port=config.port, share=config.share,
                       app_kwargs={"routes": routes}, max_file_size=limits.MAX_UPLOAD_BYTES,
                       max_threads=demo.max_threads, **kwargs)  # launch() sets it again: build_app's value


def worker_threads(config: AppConfig) -> int:
    """Events Gradio runs at once: every chat that can generate, plus Gradio's own default for the rest (history,
    settings, stop: quick events that must not wait behind the generating ones)."""
    return config.concurrency + GRADIO_DEFAULT_THREADS


def serve_with_cors(demo: gr.Blocks, config: AppConfig, routes) -> None:
    import uvicorn
    from fastapi import FastAPI
    from starlette.middleware.cors import CORSMiddleware

    app = FastAPI(routes=routes)
    app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                       allow_headers=["Authorization", "Content-Type"])
    app = gr.mount_gradio_app(app, demo, path="/", max_file_size=limits.MAX_UPLOAD_BYTES)
    print(f"rwkv-chat: serving on http://{config.server_name}:{config.port}/ (browser origins allowed: "
          f"{', '.join(config.cors_origins)})", flush=True)
    # uvicorn handles SIGTERM itself (no new connections, open ones get drain_seconds), then raises it again for
    # serve()'s handler, which stops what still runs and flushes the store.
    uvicorn.run(app, host=config.server_name, port=config.port, log_level="warning",
                timeout_graceful_shutdown=config.drain_seconds)


def serve(demo: gr.Blocks, config: AppConfig) -> None:
    """`launch` for the command line (`python app.py`, `rwkv-chat`): SIGTERM first drains (running answers end or
    are stopped within --drain-seconds, nothing new starts), then flushes the conversation store, logging each
    step, then closes the server."""
    service = demo.rwkv_service
    MemoryTrimmer(TRIM_SECONDS)  # a bounded RSS over a long day of traffic (process_memory.py); a daemon thread
    on_sigterm(service.admission, config.drain_seconds, lambda: close_store(service.store),
               lambda line: print(line, flush=True))
    launch(demo, config)


def close_store(store: ConversationStore) -> str:
    """Flush and close the store; what it did, for the log."""
    count = len(store)
    store.close()
    return f"{count} conversations saved in {store.path or 'memory (not kept)'}"


def build_app_or_exit(config: AppConfig) -> gr.Blocks:
    """`build_app` for the command line: a setting that cannot work (a state file, a --models entry, a local
    --model file that cannot be read as an RWKV checkpoint) ends the start with its reason on the console."""
    try:
        check_local_model(config.model)
        return build_app(config)
    except (StateFileError, ModelLoadError, StoreError, ModelListError) as error:
        raise SystemExit(f"error: {error}") from None


def check_local_model(source: str) -> None:
    """For a local checkpoint file: read its header (memory-mapped, cheap) and its shapes now, so a broken file
    is reported at start-up rather than on the page; ModelLoadError says what is wrong."""
    path = Path(source).expanduser()
    if path.is_file():
        config_from_state_dict(read_pth(path))


def main() -> None:
    """The installed `rwkv-chat` command: what `python app.py` does, with the same flags."""
    config = parse_config()
    serve(build_app_or_exit(config), config)


def _message_text(value) -> str:
    """The text of a chat message value (a str, or Gradio 6's list of content parts)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return _message_text(value.get("content", value.get("text", "")))
    if isinstance(value, (list, tuple)):
        return "".join(_message_text(part) for part in value)
    return "" if value is None else str(value)


class ChatPage:
    def __init__(self, service: ChatService, choices: ModelChoices, config: AppConfig,
                 state_names: tuple[str, ...] = ()):
        self.service = service
        self.state_names = state_names  # every state file the operator offers; each model gets those that fit
        self.pool: ModelPool = service.pool
        self.choices = choices
        self.config = sized_config(config, choices)
        self.pace = StreamPace()  # every stream of the page and the API shares one update budget
        self.default_settings = defaults_for(choices.default, config.preamble)
        try:
            self.default_key = choices.resolve(choices.default.value, config.device, config.dtype)
            self.startup_error = ""
        except ModelLoadError as error:
            self.default_key, self.startup_error = None, str(error)

    def preload_default(self) -> None:
        if self.default_key is not None:
            self.pool.preload(self.default_key, by_visitor=False)

    # ------------------------------------------------------------------------------------ layout
    def build(self) -> gr.Blocks:
        with gr.Blocks(title=TITLE, delete_cache=(limits.CACHE_CLEAN_S, limits.CACHE_CLEAN_S)) as demo:
            self.conversation = gr.State(self.service.start(self.default_key, self.default_settings))
            self.control = gr.State(SessionControl())
            store = self.service.store
            self.browser_id = gr.BrowserState("", storage_key=BROWSER_KEY,
                                              secret=store.secret() if store is not None else None)
            gr.Markdown(INTRO)
            with gr.Row(equal_height=False):
                with gr.Column(scale=3, min_width=420):
                    self._chat_area()
                with gr.Column(scale=2, min_width=320):
                    self._model_panel()
                    self._settings_panel()
                    self._conversation_panel()
            self._wire_chat()
            self._wire_models(demo)
            self._wire_conversations(demo)
            ChatApi(self).wire()
        return demo

    def _chat_area(self) -> None:
        self.model_status = gr.Markdown(self.status(self.service.start(self.default_key)), elem_id="model-status")
        self.chatbot = gr.Chatbot(label="Chat", height=520, editable="user", buttons=["copy", "copy_all"],
                                  elem_id="chat", layout="bubble", feedback_options=None,
                                  placeholder="Ask a question below, or pick an example.")
        self.stats = gr.Markdown(elem_id="stats")
        with gr.Row(equal_height=True):
            self.message = gr.Textbox(show_label=False, placeholder="Type a message and press Enter",
                                      lines=1, max_lines=8, scale=5, elem_id="message", autofocus=True)
            self.send_button = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="send")
            self.stop_button = gr.Button("Stop", variant="stop", scale=1, min_width=80, elem_id="stop")
        with gr.Row():
            self.retry_button = gr.Button("Retry", size="sm", elem_id="retry")
            self.undo_button = gr.Button("Undo", size="sm", elem_id="undo")
            self.clear_button = gr.Button("Clear", size="sm", elem_id="clear")
        gr.Examples(EXAMPLES, inputs=[self.message], label="Examples")

    def _model_panel(self) -> None:
        with gr.Accordion("Model", open=True):
            self.model_pick = gr.Dropdown(self._model_labels(self.config.device, self.config.dtype),
                                          value=self.choices.default.value, label="Model", elem_id="model-pick",
                                          info="download size · memory in the chosen precision · fits here?")
            with gr.Row():
                self.device = gr.Radio(list(DEVICE_CHOICES), value=self.config.device, label="Device")
                self.dtype = gr.Radio(list(DTYPE_CHOICES), value=self.config.dtype, label="Precision")
            self.load_button = gr.Button("Load model (starts a new conversation)", elem_id="load")

    def _settings_panel(self) -> None:
        defaults = self.default_settings
        with gr.Accordion("Generation", open=False):
            max_new = setting_slider(1, limits.MAX_NEW_TOKENS, value=limits.DEFAULT_NEW_TOKENS, step=1,
                                    label="Max new tokens", elem_id="max-new-tokens", setting="max_new_tokens")
            temperature = setting_slider(0, limits.MAX_TEMPERATURE, value=defaults.temperature, step=0.05,
                                        label="Temperature", info="0 = always the most likely token",
                                        setting="temperature")
            top_p = setting_slider(0.01, 1, value=defaults.top_p, step=0.01, label="Top-p", setting="top_p")
            top_k = setting_slider(0, limits.MAX_TOP_K, value=defaults.top_k, step=1, label="Top-k", info="0 = off",
                                  setting="top_k")
            presence = setting_slider(0, limits.MAX_PENALTY, value=defaults.presence_penalty, step=0.05,
                                     label="Presence penalty", setting="presence_penalty")
            frequency = setting_slider(0, limits.MAX_PENALTY, value=defaults.frequency_penalty, step=0.05,
                                      label="Frequency penalty", setting="frequency_penalty")
            decay = setting_slider(0.9, 1.0, value=defaults.penalty_decay, step=0.001, label="Penalty decay",
                                  info="how fast past tokens are forgiven (per token)", setting="penalty_decay")
            seed = setting_number(value=-1, precision=0, label="Seed", info="-1 = random; fixed = repeatable",
                                 elem_id="seed", setting="seed", empty_allowed=True)
        with gr.Accordion("Prompt", open=False):
            think = gr.Radio(list(THINK_MODES), value=defaults.think, label="Think", elem_id="think",
                             info="RWKV-7 G1: 'think' reasons first (shown folded above the answer); "
                                  "'fake think' answers at once")
            style = gr.Radio(list(TEMPLATES), value=defaults.prompt_style, label="Prompt style")
            preamble = gr.Textbox(value=self.config.preamble or "", lines=3, label="Preamble (system text)",
                                  info="read before the conversation; changing it (or the style) starts a new one")
            self.start_state = gr.Dropdown([("none", "")] + [(name, name) for name in self.state_names], value="",
                                           label="Start state", elem_id="start-state",
                                           visible=bool(self.state_names),
                                           info="a state file the server offers for this model (a persona or "
                                                "tuned style); changing it starts a new conversation")
        # The order of ChatSettings' fields.
        self.settings = [max_new, temperature, top_p, top_k, presence, frequency, decay, style, preamble, seed,
                         think, self.start_state]
        components = dict(temperature=temperature, top_p=top_p, top_k=top_k, presence_penalty=presence,
                          frequency_penalty=frequency, penalty_decay=decay, prompt_style=style, think=think)
        self.family_settings = [components[name] for name in FAMILY_FIELDS]

    def _conversation_panel(self) -> None:
        with gr.Accordion("Conversation", open=False):
            self.conversation_info = gr.Markdown(elem_id="conversation-info")
            self.transfer = gr.Code(language="json", label="Export / import (JSON)", lines=4, max_lines=12,
                                    interactive=True, elem_id="conversation-json")
            with gr.Row():
                self.export_button = gr.Button("Export", size="sm", elem_id="export")
                self.import_button = gr.Button("Import", size="sm", elem_id="import")
                self.delete_button = gr.Button("Delete conversation", size="sm", variant="stop", elem_id="delete")

    def conversation_line(self, conversation: Conversation) -> str:
        keep = self.config.keep_days
        kept = (f"kept {keep:g} days after its last change" if keep else "kept until deleted") \
            if self.config.data_dir is not None else "kept while the server runs"
        return (f"Conversation id `{conversation.id}` ({kept}). This tab finds it again after a reload; "
                f"gradio_client callers can resume it by id. Export copies it as JSON; Import continues a pasted "
                f"export with the model loaded here.")

    def status(self, conversation: Conversation) -> str:
        key = conversation.model
        if key is None:
            return f"⚠️ No model could be selected: {self.startup_error}"
        name = self.choices.get(key.choice).name
        if self.pool.peek(key) is not None:
            return f"**{name}** · {key.placement} · ready"
        error = self.pool.error(key)
        if error:
            return f"⚠️ Could not load **{name}** ({key.placement}): {error}\n\n{LOCAL_FILE_HINT}"
        if self.pool.is_loading(key):
            return f"⏳ Loading **{name}** on {key.placement}…"
        return f"**{name}** · {key.placement} · loads with the first message"

    def _model_labels(self, device: str, dtype: str) -> list[tuple[str, str]]:
        try:
            placed_on, _ = resolve_device_dtype(device, dtype)
            reclaimable = self.pool.reclaimable_bytes(str(placed_on))
        except ModelLoadError:
            reclaimable = 0
        loaded = {key.choice for key in self.pool.loaded_keys()
                  if self._same_placement(key, device, dtype)}
        return [(describe(choice, device, dtype, reclaimable, choice.value in loaded), choice.value)
                for choice in self.choices]

    @staticmethod
    def _same_placement(key: ModelKey, device: str, dtype: str) -> bool:
        try:
            placed_on, placed_as = resolve_device_dtype(device, dtype)
        except ModelLoadError:
            return False
        return key.device == str(placed_on) and DTYPES[key.dtype] == placed_as

    # ------------------------------------------------------------------------------------ chat events
    def _wire_chat(self) -> None:
        chat_outputs = [self.message, self.chatbot, self.stats, self.conversation]
        generating = dict(concurrency_id="generate", concurrency_limit=self.config.concurrency,
                          api_visibility="private", show_progress="minimal")
        quick = dict(concurrency_limit=None, api_visibility="private", show_progress="hidden")
        inputs = self.settings + [self.conversation, self.control]
        gr.on([self.message.submit, self.send_button.click], self.ui_send, [self.message] + inputs, chat_outputs,
              **generating)
        gr.on([self.chatbot.retry, self.retry_button.click], self.ui_retry, inputs, chat_outputs, **generating)
        self.chatbot.edit(self.ui_edit, inputs, chat_outputs, **generating)
        gr.on([self.chatbot.undo, self.undo_button.click], self.ui_undo, [self.conversation, self.control],
              chat_outputs, **quick)
        gr.on([self.chatbot.clear, self.clear_button.click], self.ui_clear, [self.conversation, self.control],
              chat_outputs, **quick)
        self.stop_button.click(request_stop, [self.control], None, api_name="stop", concurrency_limit=None,
                               show_progress="hidden")

    def _ui_stream(self, start, conversation: Conversation, control: SessionControl, clear_box: bool):
        """Run one generation for the page: (message box, chat, stats, conversation) per update. Blocking:
        the handlers iterate it through `threaded`."""
        updates = None
        try:
            with control.generating() as stop:
                updates = start(stop)
                first = True
                for update in self.pace.throttled(updates):
                    if first and update.notice:
                        gr.Info(update.notice)
                    box = "" if clear_box and first else gr.skip()
                    first = False
                    if update.done:
                        yield box, update.messages, update.conversation.stats, update.conversation
                    else:
                        yield box, update.messages, "", gr.skip()
        except Exception as error:  # noqa: BLE001 - reported; the conversation stays as it was
            # A toast, not an error state: the text stays in the box and the chat shows what is really kept.
            gr.Warning(reason(error), title="Not done")
            yield gr.skip(), conversation.messages(), gr.skip(), gr.skip()
        finally:
            if updates is not None:
                updates.close()

    async def ui_send(self, progress=gr.Progress(), *values):
        message, *settings, conversation, control = values
        run = lambda stop: self.service.reply(conversation, message, ChatSettings(*settings), stop,  # noqa: E731
                                              _stage_reporter(progress))
        async for update in threaded(lambda: self._ui_stream(run, conversation, control, clear_box=True)):
            yield update

    async def ui_retry(self, progress=gr.Progress(), *values):
        *settings, conversation, control = values
        run = lambda stop: self.service.retry(conversation, ChatSettings(*settings), stop,  # noqa: E731
                                              _stage_reporter(progress))
        async for update in threaded(lambda: self._ui_stream(run, conversation, control, clear_box=False)):
            yield update

    async def ui_edit(self, edit: gr.EditData, progress=gr.Progress(), *values):
        *settings, conversation, control = values
        index = edit.index[0] if isinstance(edit.index, (list, tuple)) else edit.index
        turn = conversation.turn_of_message(index)
        if turn is None:  # only user messages are editable
            yield gr.skip(), conversation.messages(), gr.skip(), gr.skip()
            return
        run = lambda stop: self.service.edit(conversation, turn, user_text(_message_text(edit.value)),  # noqa: E731
                                             ChatSettings(*settings), stop, _stage_reporter(progress))
        async for update in threaded(lambda: self._ui_stream(run, conversation, control, clear_box=False)):
            yield update

    def ui_undo(self, conversation: Conversation, control: SessionControl):
        if control.busy:
            gr.Warning("Press Stop before undoing: an answer is still being written.")
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        conversation, message = self.service.undo(conversation)
        return message or gr.skip(), conversation.messages(), "", conversation

    def ui_clear(self, conversation: Conversation, control: SessionControl):
        if control.busy:
            gr.Warning("Press Stop before clearing: an answer is still being written.")
            return gr.skip(), conversation.messages(), gr.skip(), gr.skip()
        return gr.skip(), [], "", self.service.cleared(conversation)

    # ------------------------------------------------------------------------------------ model events
    def _wire_models(self, demo: gr.Blocks) -> None:
        timer = gr.Timer(1.0, active=True)
        refresh = dict(concurrency_limit=None, api_visibility="private", show_progress="hidden")
        demo.load(self.ui_refresh, [self.conversation, self.model_pick, self.device, self.dtype],
                  [self.model_status, self.model_pick, timer], **refresh)
        timer.tick(self.ui_refresh, [self.conversation, self.model_pick, self.device, self.dtype],
                   [self.model_status, self.model_pick, timer], **refresh)
        gr.on([self.device.change, self.dtype.change], self.ui_labels, [self.device, self.dtype],
              [self.model_pick], **refresh)
        self.load_button.click(self.ui_load, [self.model_pick, self.device, self.dtype, self.conversation,
                                              self.control],
                               [self.chatbot, self.stats, self.conversation, self.model_status, self.model_pick]
                               + self.family_settings + [self.start_state],
                               concurrency_id="load", concurrency_limit=2, api_visibility="private")
        think = self.family_settings[FAMILY_FIELDS.index("think")]
        think.input(self.ui_think, [think, self.conversation], self.family_settings, **refresh)

    def ui_refresh(self, conversation: Conversation, choice: str, device: str, dtype: str):
        """Status line and picker labels; keeps polling while the session's model is loading."""
        loading = conversation.model is not None and self.pool.is_loading(conversation.model)
        picker = gr.update(choices=self._model_labels(device, dtype), value=choice)
        return self.status(conversation), picker, gr.Timer(active=loading)

    def ui_labels(self, device: str, dtype: str):
        return gr.update(choices=self._model_labels(device, dtype))

    def ui_load(self, choice: str, device: str, dtype: str, conversation: Conversation, control: SessionControl,
                progress=gr.Progress(track_tqdm=True)):
        try:
            conversation = self.switch_model(choice, device, dtype, conversation, control,
                                             _stage_reporter(progress))
            outputs = [], "", conversation, self.status(conversation)
            family = self.family_updates(defaults_for(self.choices.get(choice), self.config.preamble))
            fitting = self.pool.peek(conversation.model).start_states
            family.append(gr.update(choices=[("none", "")] + [(name, name) for name in fitting], value=""))
        except Exception as error:  # noqa: BLE001 - reported; the session keeps its model
            why = reason(error)
            gr.Warning(why, title="Model not loaded")
            hint = "" if isinstance(error, (ValueError, LoadRefused, Busy)) else f"{LOCAL_FILE_HINT}\n\n"  # refusals
            status = (f"⚠️ Could not load **{choice}**: {why}\n\n{hint}"
                      f"Still chatting with: {self.status(conversation)}")
            outputs = gr.skip(), gr.skip(), gr.skip(), status
            family = [gr.skip()] * (len(FAMILY_FIELDS) + 1)
        return *outputs, gr.update(choices=self._model_labels(device, dtype), value=choice), *family

    def family_updates(self, settings: ChatSettings) -> list:
        """The settings components set to a model family's defaults (in FAMILY_FIELDS' order)."""
        return [getattr(settings, name) for name in FAMILY_FIELDS]

    def ui_think(self, think: str, conversation: Conversation):
        """Choosing a thinking mode on a G1 model also picks the sampling that mode is used with."""
        if conversation.model is None or not is_g1(self.choices.get(conversation.model.choice)):
            return [gr.skip()] * len(FAMILY_FIELDS)
        return self.family_updates(with_think(defaults_for(self.choices.get(conversation.model.choice)), think))

    def switch_model(self, choice, device, dtype, conversation, control, progress) -> Conversation:
        if control.busy:
            raise Busy("press Stop before switching models: an answer is still being written")
        key = self.choices.resolve(choice, device, dtype)
        self.pool.get(key, progress)
        return self.service.switched(conversation, key)

    # ------------------------------------------------------------------------------------ conversation events
    def _wire_conversations(self, demo: gr.Blocks) -> None:
        quick = dict(concurrency_limit=None, api_visibility="private", show_progress="hidden")
        shown = [self.chatbot, self.stats, self.conversation, self.browser_id, self.conversation_info,
                 self.model_status, self.model_pick]
        demo.load(self.ui_restore, [self.browser_id, self.conversation], shown + self.settings, **quick)
        self.export_button.click(self.ui_export, [self.conversation], [self.transfer], **quick)
        self.import_button.click(self.ui_import, [self.transfer, self.conversation, self.control],
                                 shown + self.settings, **quick)
        self.delete_button.click(self.ui_delete, [self.conversation, self.control], shown + self.settings, **quick)

    def _shown(self, conversation: Conversation) -> list:
        """What the page shows of a conversation it switches to: chat, stats, state, browser id, id line, model
        status, picker, and its settings (those of its last answer, else the style it started with)."""
        if conversation.model is None:
            conversation = replace(conversation, model=self.default_key)
        settings = conversation.settings or replace(
            self.default_settings, prompt_style=conversation.session.template, preamble=conversation.session.preamble,
            start_state=conversation.session.start_state or "")
        settings = replace(settings, preamble=settings.preamble or "")  # the box shows no preamble as ""
        picked = conversation.model.choice if conversation.model is not None else gr.skip()
        return [conversation.messages(), conversation.stats, conversation, conversation.id,
                self.conversation_line(conversation), self.status(conversation), picked] + \
            [getattr(settings, f.name) for f in fields(ChatSettings)]

    def _unchanged(self) -> list:
        """The page as it is (a refused import or delete)."""
        return [gr.skip()] * (7 + len(self.settings))

    def ui_restore(self, browser_id: str, conversation: Conversation):
        """On page load: the conversation this browser kept (after a reload or a server restart), else the new one
        with an id the browser keeps."""
        if browser_id:
            try:
                return self._shown(self.service.resume(browser_id, self.default_key))
            except ValueError:  # deleted or expired: the id is reused for the new conversation
                conversation = replace(conversation, id=browser_id)
        conversation = self.service.identified(conversation)
        return [gr.skip(), gr.skip(), conversation, conversation.id, self.conversation_line(conversation),
                gr.skip(), gr.skip()] + [gr.skip()] * len(self.settings)

    def ui_export(self, conversation: Conversation):
        return json.dumps(to_json(self.service.identified(conversation)), ensure_ascii=False, indent=1)

    def ui_import(self, text: str, conversation: Conversation, control: SessionControl):
        if control.busy:
            gr.Warning("Press Stop before importing: an answer is still being written.")
            return self._unchanged()
        try:
            imported = self.service.imported(parsed(text), conversation.model)
        except ValueError as error:
            gr.Warning(f"Not imported: {error}", title="Not done")
            return self._unchanged()
        return self._shown(imported)

    def ui_delete(self, conversation: Conversation, control: SessionControl):
        if control.busy:
            gr.Warning("Press Stop before deleting: an answer is still being written.")
            return self._unchanged()
        return self._shown(self.service.identified(self.service.delete(conversation)))


def _stage_reporter(progress):
    """load_model's stage strings -> the Gradio progress bar (indeterminate: the stages have no fraction)."""
    def report(stage: str) -> None:
        try:
            progress(None, desc=stage)
        except Exception:  # noqa: BLE001 - progress display must never break a load
            pass
    return report


def request_stop(control: SessionControl) -> None:
    """Stop this session's answer; the part written so far is kept (the page's Stop button and API `stop`)."""
    control.request_stop()
