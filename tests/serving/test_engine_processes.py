"""Engine processes (serving/engine_processes.py) against an engine built the same way in this process: the same
answers, turn after turn; stop events and readers that leave reach the process; errors keep their type; a process
that dies fails only its own calls, its conversations move on and another process takes its place."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from checkpoints import make_state_dict, save_pth
from rwkv_chat.app.engine_factory import EngineRecipe
from rwkv_chat.loading.loader import ModelLoadError
from rwkv_chat.serving.engine import GenerationSettings
from rwkv_chat.serving.engine_processes import EngineProcessError, EngineProcesses, conversation_key
from rwkv_chat.serving.sampling import SamplingParams
from rwkv_chat.serving.session import ChatSession
from rwkv_chat.tokenizer import WorldTokenizer

GREEDY = GenerationSettings(SamplingParams(temperature=0.0, presence_penalty=0.0, frequency_penalty=0.0), 12)
ENDLESS = GenerationSettings(SamplingParams(temperature=1.0), 2048, seed=1, turn_ends_answer=False)


def quiet(_line: str) -> None:
    pass


@pytest.fixture(scope="module")
def tokenizer():
    return WorldTokenizer()


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    path = save_pth(make_state_dict("7", 2, 64, seed=3), tmp_path_factory.mktemp("model") / "tiny.pth")
    return EngineRecipe(str(path), "tiny", "cpu", "fp32", preamble="You are terse.", max_batch=4)


@pytest.fixture(scope="module")
def local(recipe, tokenizer):
    engine = recipe(quiet, tokenizer)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def processes(recipe, tokenizer):
    lines = []
    engines = EngineProcesses(recipe, 2, 1, tokenizer=tokenizer, progress=lines.append)
    engines.build_lines = lines
    yield engines
    engines.close()


def last(chunks):
    chunks = list(chunks)
    assert chunks and chunks[-1].done and not any(chunk.done for chunk in chunks[:-1])
    return chunks[-1]


def test_built_once_per_process_with_the_builds_progress(processes, local):
    assert processes.processes == 2 and len(set(processes.pids())) == 2 and os.getpid() not in processes.pids()
    assert processes.label == "tiny" and processes.model_bytes == 2 * local.model_bytes
    assert "reading the preamble" in processes.build_lines


def test_every_call_answers_as_the_engine_in_this_process(processes, local):
    for message in ("Hello there", "What is an RNN?", "Name a colour"):
        ours, theirs = ChatSession(preamble="You are terse."), ChatSession(preamble="You are terse.")
        for turn in (message, "And then?"):
            mine, other = last(processes.reply(ours, turn, GREEDY)), last(local.reply(theirs, turn, GREEDY))
            assert mine.session == other.session and mine.text == other.text
            # the conversation stayed with its process: its second turn read only its new message, as here
            assert mine.stats.prefill_tokens == other.stats.prefill_tokens
            ours, theirs = mine.session, other.session
        mine, other = last(processes.regenerate(ours, GREEDY)), last(local.regenerate(theirs, GREEDY))
        assert mine.session == other.session and mine.stats.prefill_tokens == other.stats.prefill_tokens == 0
        mine, other = last(processes.edit(ours, 0, "Edited", GREEDY)), last(local.edit(theirs, 0, "Edited", GREEDY))
        assert mine.session == other.session
    prompt = tuple(processes.tokenizer.encode("Once upon a time"))
    assert last(processes.complete(prompt, GREEDY)).written == last(local.complete(prompt, GREEDY)).written


def test_a_conversation_stays_with_its_process_when_another_is_idler(processes, tokenizer):
    session = last(processes.reply(ChatSession(preamble="You are terse."), "Sticky", GREEDY)).session
    home = processes._routes[conversation_key(session)]
    busy = processes.complete((91, 92, 93), ENDLESS)
    next(busy)
    try:
        if processes._routes[("completion", (91, 92, 93))] != home:
            pytest.skip("the completion went to the other process")  # both idle: the first is chosen, so not here
        assert processes._workers[home].in_flight > processes._workers[1 - home].in_flight
        final = last(processes.reply(session, "Again", GREEDY))
        assert final.stats.prefill_tokens == len(session.prompt_ids(tokenizer, "Again"))  # its cached state
        assert processes._routes[conversation_key(session)] == home
        fresh = last(processes.reply(ChatSession(preamble="You are terse."), "Newcomer", GREEDY)).session
        assert processes._routes[conversation_key(fresh)] == 1 - home  # a new one goes to the idler process
    finally:
        busy.close()


def test_remember_caches_a_conversation_in_its_process(processes, local, tokenizer):
    session = last(local.reply(ChatSession(preamble="You are terse."), "Remember me", GREEDY)).session
    assert processes.remember(session) == local.remember(ChatSession(preamble="You are terse.")) + len(
        session.turn_ids())  # the preamble is pinned: only the turn is read
    assert processes.remember(session) == 0
    final = last(processes.reply(session, "Next", GREEDY))
    assert final.stats.prefill_tokens == len(session.prompt_ids(tokenizer, "Next"))


def test_a_stop_event_and_a_reader_that_leaves_stop_the_answer_in_its_process(processes):
    stop = threading.Event()
    chunks = processes.complete((33, 44, 55), ENDLESS, stop)
    next(chunks)
    stop.set()
    final = last(chunks)
    assert final.stats.stop_reason == "stopped" and final.stats.new_tokens < 2048
    leaving = processes.complete((33, 44, 56), ENDLESS)
    next(leaving)
    leaving.close()
    assert all(worker.in_flight == 0 for worker in processes._workers)
    assert last(processes.complete((33,), GREEDY)).stats.new_tokens == 12


def test_errors_raise_in_the_caller_with_their_type_and_message(processes, local):
    long = "x" * 10**6
    with pytest.raises(ValueError) as here:
        local.reply(ChatSession(), long, GREEDY)
    with pytest.raises(ValueError) as there:
        processes.reply(ChatSession(), long, GREEDY)  # at the call, as in the engine: before any chunk
    assert str(there.value) == str(here.value)
    with pytest.raises(ValueError, match="start state 'nope' is not offered"):
        processes.reply(ChatSession(start_state="nope"), "Hi", GREEDY)
    with pytest.raises(IndexError, match="no turn 3"):
        processes.edit(ChatSession(), 3, "Hi", GREEDY)
    assert all(worker.in_flight == 0 for worker in processes._workers)


def test_a_failed_build_raises_its_error_and_leaves_no_process(tmp_path, tokenizer):
    missing = EngineRecipe(str(tmp_path / "missing.pth"), "missing", "cpu", "fp32")
    with pytest.raises(ModelLoadError):
        EngineProcesses(missing, 2, 1, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="at least 1 process"):
        EngineProcesses(missing, 0, 1)


def test_a_dead_process_fails_its_calls_its_chats_move_and_another_takes_its_place(recipe, local, tokenizer):
    engines = EngineProcesses(recipe, 2, 1, tokenizer=tokenizer)
    try:
        session = last(engines.reply(ChatSession(preamble="You are terse."), "Doomed", GREEDY)).session
        running = engines.complete((70, 80, 90), ENDLESS)
        next(running)
        victim = engines._workers[engines._routes[conversation_key(session)]]
        assert engines._routes[("completion", (70, 80, 90))] == victim.index  # both went to the first idle one
        other = next(worker for worker in engines._workers if worker is not victim)
        os.kill(victim.process.pid, signal.SIGKILL)
        with pytest.raises(EngineProcessError, match="stopped during the call"):
            last(running)
        victim.process.join(timeout=30)
        assert victim.process.pid not in engines.pids() and other.process.pid in engines.pids()
        expected = last(local.reply(session, "Still there?", GREEDY))
        moved = last(engines.reply(session, "Still there?", GREEDY))  # on the other process, or the new one
        assert moved.session == expected.session
        assert moved.stats.prefill_tokens == len(session.turn_ids()) + len(session.prompt_ids(tokenizer,
                                                                                                "Still there?"))
        for _ in range(600):  # another process takes the dead one's place
            if engines.processes == 2:
                break
            time.sleep(0.1)
        assert engines.restarts == 1 and engines.processes == 2 and victim.process.pid not in engines.pids()
        assert last(engines.complete((33,), GREEDY)).stats.new_tokens == 12
    finally:
        engines.close()
    with pytest.raises(EngineProcessError, match="closed"):
        engines.reply(ChatSession(), "Hi", GREEDY)


def test_engine_processes_do_not_import_the_main_script(recipe, tmp_path):
    """app.py builds a whole app when imported; a spawned process imports the parent's main script unless it is
    hidden: the script here notes every process that imports it."""
    marks = tmp_path / "imported"
    script = tmp_path / "main_script.py"
    script.write_text(
        "import json, os, pickle, sys\n"
        f"open({str(marks)!r}, 'a').write(f'{{os.getpid()}}\\n')\n"
        "from rwkv_chat.serving.engine_processes import EngineProcesses\n"
        "if __name__ == '__main__':\n"
        "    engines = EngineProcesses(pickle.loads(bytes.fromhex(sys.argv[1])), 2, 1)\n"
        "    print(json.dumps([os.getpid(), engines.pids(), sys.modules['__main__'].__file__]))\n"
        "    engines.close()\n")
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(script), pickle.dumps(recipe).hex()], capture_output=True, text=True,
                          timeout=300, cwd=repo,  # the packages where this process found them (a --target dir)
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), *sys.path])})
    assert done.returncode == 0, done.stderr
    parent, children, main_file = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(children) == 2 and parent not in children
    assert marks.read_text().split() == [str(parent)]  # imported once: by the parent, by neither engine process
    assert main_file == str(script)  # the parent's main module is whole again
