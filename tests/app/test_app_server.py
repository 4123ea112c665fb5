"""The chat app as a real server (`python app.py --model tiny.pth` on 127.0.0.1), driven by gradio_client.

Token counts are checked against the `rwkv` package's own tokenizer (the reference, not ours): after the first
turn a turn must read exactly the tokens of "\\n\\nQuestion: {msg}\\n\\nAnswer:", because the RNN state after the
previous answer is reused.
"""

from __future__ import annotations

import os
import threading

import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError

from app_harness import chat_stats, running_app
from rwkv_chat import limits
from rwkv_chat.app.config import parse_config
from rwkv_chat.loading.catalog import CATALOG

SHORT = dict(max_new_tokens=12, seed=7)


@pytest.fixture(scope="module")
def tiny(make_checkpoint):
    return make_checkpoint("5.0", n_layer=2, n_embd=128)


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    with running_app(["--model", str(tiny.path), "--device", "cpu"], tmp_path_factory.mktemp("app")) as app:
        yield app


@pytest.fixture(scope="module")
def ref_tokenizer():
    import rwkv
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
    return TRIE_TOKENIZER(os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt"))


def client(server) -> Client:
    return Client(server.url, verbose=False)


def chat(c: Client, message: str, **settings) -> tuple[str, str]:
    return c.predict(message, **{**SHORT, **settings}, api_name="/chat")


def first_turn_tokens(tok, message: str) -> int:
    return len(tok.encode(f"Question: {message}\n\nAnswer:"))


def next_turn_tokens(tok, message: str) -> int:
    return len(tok.encode(f"\n\nQuestion: {message}\n\nAnswer:"))


def test_each_turn_reads_only_its_own_new_tokens(server, ref_tokenizer):
    c = client(server)
    messages = ["Hello, who are you?", "Tell me about dragons.", "请介绍一下北京的旅游景点"]
    answer, stats = chat(c, messages[0])
    assert chat_stats(stats) == first_turn_tokens(ref_tokenizer, messages[0])
    assert "cpu fp32" in stats and answer
    for message in messages[1:]:
        answer, stats = chat(c, message)
        assert chat_stats(stats) == next_turn_tokens(ref_tokenizer, message)
    history = c.predict(api_name="/history")
    assert [m for m, _ in history] == messages
    assert history[-1][1] == answer


def test_retry_reads_nothing_and_repeats_with_the_same_seed(server):
    c = client(server)
    chat(c, "First question")
    answer, _ = chat(c, "Second question", seed=11)
    again, stats = c.predict(**SHORT | {"seed": 11}, api_name="/retry")
    assert chat_stats(stats) == 0
    assert again == answer
    other, stats = c.predict(**SHORT | {"seed": 12}, api_name="/retry")
    assert chat_stats(stats) == 0
    history = c.predict(api_name="/history")
    assert [m for m, _ in history] == ["First question", "Second question"]
    assert history[-1][1] == other


def test_undo_returns_to_the_state_after_the_previous_answer(server, ref_tokenizer):
    c = client(server)
    chat(c, "One")
    chat(c, "Two")
    assert c.predict(api_name="/undo") == "Two"
    assert [m for m, _ in c.predict(api_name="/history")] == ["One"]
    _, stats = chat(c, "Three")
    assert chat_stats(stats) == next_turn_tokens(ref_tokenizer, "Three")
    assert [m for m, _ in c.predict(api_name="/history")] == ["One", "Three"]


def test_edit_replaces_a_message_and_drops_what_followed(server, ref_tokenizer):
    c = client(server)
    chat(c, "Alpha")
    chat(c, "Beta")
    chat(c, "Gamma")
    answer, stats = c.predict(1, "Delta", **SHORT, api_name="/edit")
    assert chat_stats(stats) == next_turn_tokens(ref_tokenizer, "Delta")
    history = c.predict(api_name="/history")
    assert [m for m, _ in history] == ["Alpha", "Delta"] and history[-1][1] == answer
    _, stats = c.predict(0, "Omega", **SHORT, api_name="/edit")
    assert chat_stats(stats) == first_turn_tokens(ref_tokenizer, "Omega")
    assert [m for m, _ in c.predict(api_name="/history")] == ["Omega"]


def test_stop_keeps_the_partial_answer_and_a_matching_state(server, ref_tokenizer):
    c = client(server)
    job = c.submit("Write a very long story.", max_new_tokens=limits.MAX_NEW_TOKENS, seed=0, api_name="/chat")
    for answer, _stats in job:  # wait until the answer is streaming
        if answer:
            break
    c.predict(api_name="/stop")
    answer, stats = job.result()
    assert stats.endswith("stopped")
    new_tokens = int(stats.split(" tok at ")[0].rsplit(" ", 1)[-1])
    assert 0 < new_tokens < limits.MAX_NEW_TOKENS
    assert c.predict(api_name="/history") == [["Write a very long story.", answer]]
    _, stats = chat(c, "And then?")
    assert chat_stats(stats) == next_turn_tokens(ref_tokenizer, "And then?")


def test_a_cancelled_request_frees_its_session(server):
    c = client(server)
    job = c.submit("Go on and on.", max_new_tokens=limits.MAX_NEW_TOKENS, api_name="/chat")
    for answer, _stats in job:
        if answer:
            break
    job.cancel()
    for _attempt in range(60):  # the closed generator releases the session; then a new message is accepted
        try:
            answer, stats = chat(c, "Are you there?")
            break
        except AppError as error:
            assert "still being written" in str(error)
            threading.Event().wait(0.5)
    else:
        pytest.fail("the session stayed busy after its request was cancelled")
    assert "prefill" in stats


def test_two_concurrent_clients_never_see_each_other(server):
    results = {}

    def converse(name: str) -> None:
        c = client(server)
        outputs = [chat(c, f"{name} first question", max_new_tokens=40, seed=5),
                   chat(c, f"{name} second question", max_new_tokens=40, seed=5)]
        results[name] = (outputs, c.predict(api_name="/history"))

    names = ("Zqxalpha", "Vwkbravo")  # markers a random model will not write
    threads = [threading.Thread(target=converse, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert set(results) == set(names)
    for name, other in (names, names[::-1]):
        outputs, history = results[name]
        assert [m for m, _ in history] == [f"{name} first question", f"{name} second question"]
        assert [a for _, a in history] == [answer for answer, _ in outputs]
        assert other not in repr(history)
    # same seed, same model, same prompts apart from the name: each answer is its own conversation's
    assert results[names[0]][1] != results[names[1]][1]


def test_a_server_of_two_engine_processes_answers_as_one_and_carries_each_state(server, tiny, ref_tokenizer,
                                                                                tmp_path):
    """--engine-processes 2: three clients at once get the answers the one-process server gives them one after
    another, every turn reads only its new message (its state stayed in its process), a retry reads nothing."""
    conversations = {name: [f"{name} first question", f"{name} second question", f"{name} third"]
                     for name in ("Zqxalpha", "Vwkbravo", "Qjucharlie")}

    def converse(url: str, messages: list[str], out: dict) -> None:
        c = Client(url, verbose=False)
        out[messages[0]] = [chat(c, message, max_new_tokens=24, seed=5) for message in messages]
        out[messages[0]].append(c.predict(max_new_tokens=24, seed=5, api_name="/retry"))

    one, two = {}, {}
    for messages in conversations.values():
        converse(server.url, messages, one)
    with running_app(["--model", str(tiny.path), "--device", "cpu", "--engine-processes", "2"], tmp_path) as app:
        threads = [threading.Thread(target=converse, args=(app.url, messages, two))
                   for messages in conversations.values()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        log = app.log()
    assert "Traceback" not in log and "served by 2 engine processes of 1 torch threads each" in log
    for messages in conversations.values():
        answers = two[messages[0]]
        assert [answer for answer, _ in answers[:3]] == [answer for answer, _ in one[messages[0]][:3]]
        assert chat_stats(answers[0][1]) == first_turn_tokens(ref_tokenizer, messages[0])
        for (_, stats), message in zip(answers[1:3], messages[1:]):
            assert chat_stats(stats) == next_turn_tokens(ref_tokenizer, message)  # its state was in its process
        assert answers[3][0] == one[messages[0]][3][0] and chat_stats(answers[3][1]) == 0  # retry: nothing read


def test_refused_input_changes_nothing(server):
    c = client(server)
    chat(c, "Keep me")
    before = c.predict(api_name="/history")
    with pytest.raises(AppError, match="limit"):
        chat(c, "x" * (limits.MAX_MESSAGE_CHARS + 1))
    with pytest.raises(AppError, match="empty"):
        chat(c, "   ")
    with pytest.raises(AppError):
        chat(c, "too many", max_new_tokens=limits.MAX_NEW_TOKENS + 1)
    with pytest.raises(AppError, match="no answer to retry|no message"):
        c.predict(5, "nope", **SHORT, api_name="/edit")
    assert c.predict(api_name="/history") == before


def test_models_offered_are_the_catalog_and_the_servers_model(server, tiny):
    c = client(server)
    chat(c, "Hello")  # the server's model is loaded by the first chat (not by an earlier test)
    rows = c.predict("cpu", "fp32", api_name="/list_models")
    names = [row["name"] for row in rows]
    assert names == [tiny.path.name] + [entry.name for entry in CATALOG]
    assert str(tiny.path.parent) not in repr(rows)  # the page shows no server directories
    by_name = {row["name"]: row for row in rows}
    assert by_name["RWKV-5 World 7B"]["download_bytes"] == 15_036_197_526
    assert by_name["RWKV-5 World 0.1B"]["memory_bytes"] > 0
    assert by_name[tiny.path.name]["loaded"] == ["cpu fp32"] and by_name[tiny.path.name]["fits"]
    with pytest.raises(AppError):
        c.predict(str(tiny.path), "cpu", "fp32", api_name="/select_model")  # a path is not a choice
    with pytest.raises(AppError):
        c.predict("/etc/passwd", "cpu", "fp32", api_name="/select_model")


def test_switching_model_starts_a_new_conversation(server, tiny, ref_tokenizer):
    c = client(server)
    chat(c, "Before the switch")
    status = c.predict(tiny.path.name, "cpu", "bf16", api_name="/select_model")
    assert "cpu bf16" in status and "ready" in status
    assert c.predict(api_name="/history") == []
    answer, stats = chat(c, "After the switch")
    assert "cpu bf16" in stats
    assert chat_stats(stats) == first_turn_tokens(ref_tokenizer, "After the switch")
    rows = c.predict("cpu", "bf16", api_name="/list_models")
    assert sorted(next(r for r in rows if r["name"] == tiny.path.name)["loaded"]) == ["cpu bf16", "cpu fp32"]


def test_reset_starts_over_with_the_same_model(server, ref_tokenizer):
    c = client(server)
    chat(c, "Remember me")
    assert "ready" in c.predict(api_name="/reset")
    assert c.predict(api_name="/history") == []
    _, stats = chat(c, "Fresh start")
    assert chat_stats(stats) == first_turn_tokens(ref_tokenizer, "Fresh start")


def test_offline_hub_still_serves_the_page_and_says_what_failed(tmp_path):
    with running_app([], tmp_path) as app:  # default catalog model, HF_HUB_OFFLINE=1, empty HF_HOME
        import urllib.request
        with urllib.request.urlopen(app.url, timeout=30) as page:
            assert page.status == 200
        c = Client(app.url, verbose=False)
        with pytest.raises(AppError) as refused:
            chat(c, "Hello?")
        message = str(refused.value)
        assert "HF_HUB_OFFLINE" in message and "--model" in message
        status = c.predict(api_name="/reset")
        default = parse_config([], {}).model  # RWKV-5 World 0.1B on a CPU, a G1 model where a GPU is present
        assert "Could not load" in status and f"**{default}**" in status and "--model" in status


@pytest.fixture(scope="module")
def g1_server(tmp_path_factory):
    from checkpoints import make_state_dict, save_pth
    root = tmp_path_factory.mktemp("g1")
    path = save_pth(make_state_dict("7", n_layer=2, n_embd=128, seed=4), root / "rwkv7-g1x-tiny-ctx4096.pth")
    gen = torch.Generator().manual_seed(9)
    persona = save_pth({f"blocks.{i}.att.time_state": torch.randn(2, 64, 64, generator=gen) for i in range(2)},
                       root / "persona.pth")
    misfit = save_pth({"blocks.0.att.time_state": torch.randn(2, 64, 64, generator=gen)}, root / "misfit.pth")
    with running_app(["--model", str(path), "--device", "cpu", "--state", f"persona={persona}",
                      "--state", f"misfit={misfit}"], root) as app:
        yield app


def test_a_g1_model_chats_with_its_familys_template_and_keeps_reasoning_out_of_the_answer(g1_server, ref_tokenizer):
    c = client(g1_server)
    answer, stats = chat(c, "Hello")  # the page's defaults for a G1 model: User/Assistant, "fake think"
    assert chat_stats(stats) == len(ref_tokenizer.encode("User: Hello\n\nAssistant: <think></think"))
    answer, stats = chat(c, "Why?", think="think", max_new_tokens=8)
    assert chat_stats(stats) == len(ref_tokenizer.encode("\n\nUser: Why?\n\nAssistant: <think"))
    history = c.predict(api_name="/history")
    written = history[-1][2] if len(history[-1]) == 3 else ""
    # random weights never close the tag: what they wrote is reasoning, and none of it is the answer
    assert answer == "" and history[-1][1] == "" and written
    with pytest.raises(Exception, match="'deeply'.*not in the list of choices.*'off', 'think', 'fake think'"):
        chat(c, "Hm", think="deeply")  # refused by the client against the page's Think radio


def test_a_chat_can_start_from_a_state_file_the_operator_offers(g1_server, ref_tokenizer):
    c = client(g1_server)
    plain, _ = chat(c, "Hello", think="off")
    answer, stats = chat(c, "Hello", think="off", start_state="persona")  # a new conversation, from the state
    assert chat_stats(stats) == len(ref_tokenizer.encode("User: Hello\n\nAssistant:"))
    assert len(c.predict(api_name="/history")) == 1 and answer != plain
    again, stats = chat(c, "Hello", think="off", start_state="persona", seed=SHORT["seed"])
    with pytest.raises(AppError, match="start state 'misfit' is not offered for this model"):
        chat(c, "Hello", start_state="misfit")  # a 1-layer state does not fit this 2-layer model
    with pytest.raises(Exception, match="not in the list of choices"):
        chat(c, "Hello", start_state="/etc/passwd")  # never a path: only the operator's names


def test_a_broken_model_file_stops_the_start_with_its_reason(tmp_path):
    import subprocess
    import sys
    from app_harness import REPO
    (tmp_path / "empty.pth").write_bytes(b"")
    done = subprocess.run([sys.executable, "app.py", "--model", str(tmp_path / "empty.pth"), "--device", "cpu"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode != 0 and "error: cannot read" in done.stderr and "the file is empty" in done.stderr


def test_a_bad_state_file_stops_the_start_with_its_reason(tiny, tmp_path):
    import subprocess
    import sys
    from app_harness import REPO
    done = subprocess.run([sys.executable, "app.py", "--model", str(tiny.path), "--device", "cpu", "--state",
                           f"gone={tmp_path / 'gone.pth'}"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode != 0 and "error: cannot read state file" in done.stderr and "(gone)" in done.stderr


def test_refusals_name_the_setting_and_a_new_style_says_it_started_over(server):
    c = client(server)
    chat(c, "First")
    with pytest.raises(AppError, match="message must be text, got nothing"):
        c.predict(None, **SHORT, api_name="/chat")
    with pytest.raises(AppError, match="seed must be between -1 \\(random\\) and 9223372036854775807"):
        chat(c, "Hi", seed=2**70)
    with pytest.raises(AppError, match="turn_index must be a whole number, got 0.5"):
        c.predict(0.5, "Edited", **SHORT, api_name="/edit")
    assert [m for m, _ in c.predict(api_name="/history")] == ["First"]  # nothing changed
    _, stats = chat(c, "Again", prompt_style="User/Assistant")
    assert stats.startswith("[new conversation (prompt style, preamble or start state changed)] prefill ")
    assert [m for m, _ in c.predict(api_name="/history")] == ["Again"]


def test_the_upload_route_refuses_files(server):
    import urllib.error
    import urllib.request
    boundary = "rwkvchatboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.bin\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + b"x" * 20_000 + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(server.url + "gradio_api/upload", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 413
