"""Conversations across a real server's restart (`python app.py`, SIGTERM, then again on the same data directory),
driven by gradio_client: a client resumes its conversation by id and the next turn is exactly what it would have
been without the restart; SIGTERM lets the answer being written end, saves it, and logs what it did."""

from __future__ import annotations

import signal
import time

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from app_harness import chat_stats, running_app

SETTINGS = dict(max_new_tokens=10, seed=5)


@pytest.fixture(scope="module")
def tiny(make_checkpoint):
    return make_checkpoint("5.2", n_layer=2, n_embd=128)


def chat(client: Client, message: str, **settings) -> tuple[str, str]:
    return client.predict(message, **{**SETTINGS, **settings}, api_name="/chat")


def ended(app, timeout: float = 60) -> int:
    """SIGTERM the server and wait for it to end; its exit status."""
    app.process.send_signal(signal.SIGTERM)
    return app.process.wait(timeout=timeout)


def test_a_client_resumes_by_id_after_a_restart_and_the_next_turn_is_exact(tiny, tmp_path):
    data = {"RWKV_DATA_DIR": str(tmp_path / "data")}
    args = ["--model", str(tiny.path), "--device", "cpu"]
    with running_app(args, tmp_path / "first", data) as first:
        before = Client(first.url, verbose=False)
        one, _ = chat(before, "One")
        two, _ = chat(before, "Two")
        conversation_id = before.predict(api_name="/conversation_id")
        exported = before.predict(api_name="/export_conversation")
        assert ended(first) == 0
        log = first.log()
    assert "SIGTERM: taking no new messages" in log and "1 conversations saved in" in log

    with running_app(args, tmp_path / "second", data) as second:
        after = Client(second.url, verbose=False)
        assert after.predict(conversation_id, api_name="/resume") == [["One", one], ["Two", two]]
        three, stats = chat(after, "Three")
        turns = after.predict(api_name="/export_conversation")["session"]["turns"]
        assert turns[:2] == exported["session"]["turns"]  # the saved token ids, as they were
        # a new process has no cached state: the saved tokens were read again, then the new turn's
        assert chat_stats(stats) == sum(len(t["prompt_ids"]) + len(t["answer_ids"]) for t in turns[:2]) + \
            len(turns[2]["prompt_ids"])
        control = Client(second.url, verbose=False)  # the same three turns on a server that never stopped
        assert [chat(control, m)[0] for m in ("One", "Two", "Three")] == [one, two, three]
        assert after.predict(api_name="/history") == [["One", one], ["Two", two], ["Three", three]]

        copy = Client(second.url, verbose=False)  # an export continues elsewhere as a new conversation
        assert copy.predict(exported, api_name="/import_conversation") == [["One", one], ["Two", two]]
        assert copy.predict(api_name="/conversation_id") != conversation_id
        assert chat(copy, "Three")[0] == three

        new_id = after.predict(api_name="/delete_conversation")
        assert new_id != conversation_id and after.predict(api_name="/history") == []
        with pytest.raises(AppError, match="no saved conversation has the id"):
            Client(second.url, verbose=False).predict(conversation_id, api_name="/resume")
        with pytest.raises(AppError, match=r"not imported: .*format"):
            copy.predict({"format": "x"}, api_name="/import_conversation")


def test_sigterm_lets_the_answer_being_written_end_and_keeps_it(tiny, tmp_path):
    data = {"RWKV_DATA_DIR": str(tmp_path / "data")}
    args = ["--model", str(tiny.path), "--device", "cpu", "--drain-seconds", "2"]
    with running_app(args, tmp_path / "first", data) as first:
        writer = Client(first.url, verbose=False)
        conversation_id = writer.predict(api_name="/conversation_id")
        job = writer.submit("Write at length.", max_new_tokens=2048, seed=3, api_name="/chat")
        deadline = time.monotonic() + 60
        while not job.outputs() and time.monotonic() < deadline:  # the answer has started streaming
            time.sleep(0.05)
        assert job.outputs()
        assert ended(first) == 0
        answer, stats = job.result(timeout=30)  # an answer (finished, or stopped after 2 s), never an error
        log = first.log()
    assert "1 answers were being written" in log and "conversations saved in" in log
    assert answer and "prefill" in stats

    with running_app(args, tmp_path / "second", data) as second:
        resumed = Client(second.url, verbose=False).predict(conversation_id, api_name="/resume")
        assert resumed == [["Write at length.", answer]]
