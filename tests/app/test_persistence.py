"""Conversations that survive restarts, without a server: the JSON form (and what an import refuses), the SQLite
store (durable, expiring, closed cleanly), the chat service saving each turn, a conversation resumed in a fresh
process continuing exactly as one that never stopped, and the drain that SIGTERM runs."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace

import pytest

from rwkv_chat.app.chat_service import ChatService, ChatSettings, Conversation
from rwkv_chat.app.conversation_codec import FORMAT, from_json, to_json
from rwkv_chat.app.conversation_store import ConversationStore
from rwkv_chat.app.draining import ShuttingDown
from rwkv_chat.app.engine_factory import EngineFactory
from rwkv_chat.app.model_choices import ModelChoices
from rwkv_chat.app.model_pool import ModelPool

GREEDY = ChatSettings(max_new_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def tiny_path(make_checkpoint):
    return str(make_checkpoint("5.2", n_layer=2, n_embd=128).path)


def fresh_service(tiny_path, store=None) -> tuple[ChatService, object]:
    """A service with its own pool (an empty prefix-state cache, as after a restart)."""
    choices = ModelChoices(tiny_path)
    pool = ModelPool(choices, EngineFactory(choices, batching=False))
    return ChatService(pool, store), choices.resolve(choices.default.value, "cpu", "fp32")


def finish(updates):
    *_, last = list(updates)
    assert last.done
    return last.conversation


def prefill(conversation) -> int:
    return int(conversation.stats.split("prefill ")[1].split(" tok")[0])


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------------------------------- the JSON form

def test_the_json_form_keeps_every_token_and_setting(tiny_path):
    service, model = fresh_service(tiny_path)
    settings = replace(GREEDY, preamble="Be brief.", seed=7)
    one = finish(service.reply(service.start(model, settings), "Hi <b>there</b>", settings))
    two = finish(service.reply(one, "And then?", settings))
    data = json.loads(json.dumps(to_json(two)))  # through real JSON text
    assert data["format"] == FORMAT and data["id"] == two.id and len(two.id) == 32
    assert from_json(data) == two


@pytest.mark.parametrize("change, complaint", [
    (lambda d: d.update(format="something else"), "not an exported conversation"),
    (lambda d: d.update(version=2), "version 2 is not supported"),
    (lambda d: d["session"]["turns"][0].update(prompt_ids=[1, -3]), r"turn 0.prompt_ids must hold token ids"),
    (lambda d: d["session"]["turns"][0].update(answer_ids=[True]), r"turn 0.answer_ids must hold token ids"),
    (lambda d: d["session"]["turns"][0].update(answer_ids="1 2 3"), r"turn 0.answer_ids is missing"),
    (lambda d: d["session"]["turns"][0].pop("message"), r"turn 0.message is missing"),
    (lambda d: d["session"].update(template="Bob/Alice"), "session.template"),
    (lambda d: d["session"].update(preamble="x" * 9000), "preamble has 9000 characters; the limit is 8000"),
    (lambda d: d.update(settings={"temperature": 99.0}), "temperature must be at most 5.0"),
    (lambda d: d.update(settings={"evil": 1}), "settings has unknown fields: evil"),
    (lambda d: d.update(model={"choice": "x", "device": "cpu", "dtype": "fp32", "path": "/etc/passwd"}),
     "model must be an object"),
])
def test_an_import_names_what_is_wrong(tiny_path, change, complaint):
    service, model = fresh_service(tiny_path)
    data = to_json(finish(service.reply(service.start(model), "Hi", GREEDY)))
    change(data)
    with pytest.raises(ValueError, match=complaint):
        from_json(data)
    for junk in (None, [], "text", {"format": FORMAT, "version": 1}):
        with pytest.raises(ValueError):
            from_json(junk)


# ---------------------------------------------------------------------------------------- the store

def test_the_store_is_durable_expires_old_conversations_and_keeps_its_secret(tmp_path, tiny_path):
    service, model = fresh_service(tiny_path)
    clock = Clock()
    path = tmp_path / "data" / "conversations.sqlite3"
    store = ConversationStore(path, max_age_s=100, clock=clock)
    old = finish(service.reply(service.start(model), "old", GREEDY))
    store.save(old)
    clock.now += 60
    new = finish(service.reply(service.start(model), "new", GREEDY))
    store.save(new)
    secret = store.secret()
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.load(new.id)

    reopened = ConversationStore(path, max_age_s=100, clock=clock)  # a restart
    assert reopened.load(new.id) == new and reopened.load(old.id) == old
    assert reopened.secret() == secret and len(reopened) == 2
    clock.now += 50  # old is 110 s unchanged, new 50 s
    assert reopened.load(old.id) is None and reopened.load(new.id) == new
    assert reopened.expire() == 1 and len(reopened) == 1
    assert reopened.delete(new.id) and reopened.load(new.id) is None and not reopened.delete(new.id)
    with pytest.raises(ValueError, match="needs an id"):
        reopened.save(Conversation(model))
    reopened.close()
    assert ConversationStore(None).secret() != secret  # in memory: nothing kept, a secret of its own


def test_the_store_takes_concurrent_writers(tmp_path, tiny_path):
    service, model = fresh_service(tiny_path)
    store = ConversationStore(tmp_path / "c.sqlite3")
    base = finish(service.reply(service.start(model), "Hi", GREEDY))
    copies = [replace(base, id=f"{i:032x}") for i in range(64)]
    threads = [threading.Thread(target=lambda c=c: [store.save(c) for _ in range(5)]) for c in copies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(store) == 64 and all(store.load(c.id) == c for c in copies)


# ---------------------------------------------------------------------------------------- the service

def test_each_turn_end_undo_clear_and_switch_is_saved_and_delete_forgets(tmp_path, tiny_path):
    store = ConversationStore(tmp_path / "c.sqlite3")
    service, model = fresh_service(tiny_path, store)
    one = finish(service.reply(service.start(model), "One", GREEDY))
    assert store.load(one.id) == one and one.settings == GREEDY
    two = finish(service.reply(one, "Two", GREEDY))
    assert two.id == one.id and store.load(one.id) == two
    undone, message = service.undo(two)
    assert message == "Two" and store.load(one.id).history() == undone.history() == one.history()
    cleared = service.cleared(undone)
    assert store.load(one.id).history() == [] and cleared.id == one.id
    fresh = service.delete(cleared)
    assert store.load(one.id) is None and fresh.id == "" and fresh.model == model
    assert service.switched(finish(service.reply(fresh, "Hi", GREEDY)), model).session.turns == ()


def test_a_resumed_conversation_continues_exactly_as_one_that_never_stopped(tmp_path, tiny_path):
    path = tmp_path / "c.sqlite3"
    store = ConversationStore(path)
    service, model = fresh_service(tiny_path, store)
    settings = replace(GREEDY, preamble="Answer in one word.")
    two = finish(service.reply(finish(service.reply(service.start(model, settings), "One", settings)), "Two",
                               settings))
    store.close()
    service.store = None  # this one goes on without saving: the conversation as it would be had nothing stopped
    unbroken = finish(service.reply(two, "Three", settings))

    restarted, _ = fresh_service(tiny_path, ConversationStore(path))  # a new process: an empty state cache
    resumed = restarted.resume(two.id)
    assert resumed == two
    continued = finish(restarted.reply(resumed, "Three", settings))
    assert continued.session == unbroken.session  # the same token ids: the state was rebuilt exactly
    assert prefill(continued) == len(continued.session.context_ids(restarted.pool.get(model).tokenizer, 2)) + \
        len(continued.session.turns[2].prompt_ids)  # on a cache miss the saved tokens are read again
    with pytest.raises(ValueError, match="no saved conversation has the id 'nope'"):
        restarted.resume("nope")
    with pytest.raises(ValueError, match="conversation_id must be"):
        restarted.resume(None)


def test_a_resumed_conversation_whose_model_is_no_longer_offered_comes_back_without_one(tmp_path, tiny_path):
    store = ConversationStore(tmp_path / "c.sqlite3")
    service, model = fresh_service(tiny_path, store)
    saved = finish(service.reply(service.start(model), "Hi", GREEDY))
    store.save(replace(saved, model=replace(model, choice="a model this server does not offer")))
    assert service.resume(saved.id).model is None


def test_an_import_becomes_a_new_conversation_with_the_importers_model(tmp_path, tiny_path):
    store = ConversationStore(tmp_path / "c.sqlite3")
    service, model = fresh_service(tiny_path, store)
    original = finish(service.reply(service.start(model), "Hi", GREEDY))
    imported = service.imported(from_json(to_json(replace(original, model=None))), model)
    assert imported.id != original.id and imported.model == model
    assert store.load(imported.id).session == original.session


# ---------------------------------------------------------------------------------------- draining

def test_a_drain_lets_running_answers_end_and_refuses_new_ones(tiny_path):
    service, model = fresh_service(tiny_path)
    admission = service.admission
    stop = threading.Event()
    updates = service.reply(service.start(model), "Hi", replace(GREEDY, max_new_tokens=200), stop)
    next(updates)  # the answer has started
    next(updates)
    assert admission.running_count() == 1
    report = {}
    drainer = threading.Thread(target=lambda: report.update(r=admission.drain(wait_s=30)))
    drainer.start()
    time.sleep(0.2)
    with pytest.raises(ShuttingDown, match="your conversation is saved"):
        service.reply(service.start(model), "Hi", GREEDY)
    final = list(updates)[-1]
    drainer.join(10)
    assert final.done and not stop.is_set()  # it ended by itself: nothing was cut
    assert (report["r"].running, report["r"].finished, report["r"].stopped, report["r"].left) == (1, 1, 0, 0)


def test_a_drain_stops_what_outlasts_the_wait_and_the_partial_answer_is_saved(tmp_path, tiny_path):
    store = ConversationStore(tmp_path / "c.sqlite3")
    service, model = fresh_service(tiny_path, store)
    stop = threading.Event()
    updates = service.reply(service.start(model), "Hi", replace(GREEDY, max_new_tokens=2000), stop)
    next(updates)
    next(updates)
    result = {}
    consumer = threading.Thread(target=lambda: result.update(final=list(updates)[-1]))
    consumer.start()
    report = service.admission.drain(wait_s=0.3)
    consumer.join(10)
    assert (report.running, report.stopped, report.left) == (1, 1, 0) and stop.is_set()
    final = result["final"]
    assert final.done and 0 < len(final.conversation.session.turns[0].answer_ids) < 2000
    assert store.load(final.conversation.id) == final.conversation


def test_a_store_that_cannot_write_is_reported_and_the_chat_goes_on(tmp_path, tiny_path):
    store = ConversationStore(tmp_path / "c.sqlite3")
    service, model = fresh_service(tiny_path, store)
    lines = []
    service._log = lines.append
    store.close()
    conversation = finish(service.reply(service.start(model), "Hi", GREEDY))
    assert conversation.session.turns and "could not save conversation" in lines[0]


def test_an_unusable_data_dir_stops_the_start_naming_it(tmp_path):
    from rwkv_chat.app.config import AppConfig
    from rwkv_chat.app.ui import open_store
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(Exception, match=r"cannot keep conversations in .*file.*--data-dir"):
        open_store(AppConfig(data_dir=str(blocker)))
    assert open_store(AppConfig()).path is None  # no data dir: in memory


def test_the_data_dir_comes_from_flags_the_environment_a_spaces_storage_or_the_cache(tmp_path, monkeypatch):
    from rwkv_chat.app import config
    from rwkv_chat.app.config import parse_config
    assert parse_config(["--data-dir", "/srv/chats"], {"RWKV_DATA_DIR": "/x"}).data_dir == "/srv/chats"
    assert parse_config([], {"RWKV_DATA_DIR": "/x"}).data_dir == "/x"
    assert parse_config([], {"XDG_CACHE_HOME": "/cache"}).data_dir == "/cache/rwkv-chat"
    monkeypatch.setattr(config, "SPACE_STORAGE", tmp_path)  # a Space with persistent storage mounted
    assert parse_config([], {"SPACE_ID": "me/chat"}).data_dir == str(tmp_path / "rwkv-chat")
    monkeypatch.setattr(config, "SPACE_STORAGE", tmp_path / "absent")  # one without
    assert parse_config([], {"SPACE_ID": "me/chat", "XDG_CACHE_HOME": "/c"}).data_dir == "/c/rwkv-chat"
    chosen = parse_config(["--keep-days", "0", "--drain-seconds", "3"], {"RWKV_KEEP_DAYS": "7"})
    assert (chosen.keep_days, chosen.drain_seconds) == (0, 3)
    assert parse_config([], {"RWKV_KEEP_DAYS": "7"}).keep_days == 7
    with pytest.raises(ValueError, match="keep_days must be between 0"):
        parse_config(["--keep-days", "-1"], {})


def test_the_page_restores_exports_imports_and_deletes(tmp_path, tiny_path):
    import gradio as gr
    from rwkv_chat.app.chat_service import SessionControl
    from rwkv_chat.app.config import AppConfig
    from rwkv_chat.app.ui import ChatPage
    store = ConversationStore(tmp_path / "c.sqlite3")
    service, model = fresh_service(tiny_path, store)
    page = ChatPage(service, service.pool.choices, AppConfig(model=tiny_path, device="cpu", dtype="fp32",
                                                             data_dir=str(tmp_path)))
    page.build()
    settings = replace(GREEDY, preamble="Be brief.", top_k=3)
    saved = finish(service.reply(service.start(model, settings), "Hi", settings))
    messages, stats, restored, browser_id, line, _, picked, *values = page.ui_restore(saved.id, Conversation(model))
    assert restored == saved and browser_id == saved.id and saved.id in line and picked == model.choice
    assert messages == saved.messages() and stats == saved.stats
    assert ChatSettings(*values) == replace(settings, preamble="Be brief.")  # the page's settings come back

    fresh = page.ui_restore("", Conversation(model))  # nothing kept in this browser: a new id for it to keep
    assert fresh[2].id and fresh[3] == fresh[2].id and fresh[2].session.turns == ()

    exported = page.ui_export(saved)
    assert json.loads(exported)["id"] == saved.id
    imported = page.ui_import(exported, Conversation(model), SessionControl())
    assert imported[2].id != saved.id and imported[0] == saved.messages() and store.load(imported[2].id)
    refused = page.ui_import("{not json", Conversation(model), SessionControl())
    assert all(value == gr.skip() for value in refused)  # nothing on the page changes

    emptied = page.ui_delete(saved, SessionControl())
    assert store.load(saved.id) is None and emptied[0] == [] and emptied[2].id not in ("", saved.id)
