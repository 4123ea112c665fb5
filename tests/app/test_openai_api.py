"""The OpenAI-compatible API on the app's own server (`python app.py`, 127.0.0.1), driven by the official `openai`
client: models, chat and plain completions, streaming or not, the prefix cache across stateless requests, G1
reasoning kept apart, concurrency, and every error code."""

from __future__ import annotations

import json
import re
import os
import threading
import time
import urllib.request

import openai
import pytest

from app_harness import running_app
from checkpoints import make_state_dict, save_pth

KEY = "test-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    tiny = save_pth(make_state_dict("5.2", n_layer=2, n_embd=128, seed=1), root / "tiny.pth")
    with running_app(["--model", str(tiny), "--device", "cpu", "--api-key", KEY, "--max-queue", "3"], root) as app:
        wait_until_loaded(app.url, "tiny.pth")
        yield app


@pytest.fixture(scope="module")
def g1_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai-g1")
    path = save_pth(make_state_dict("7", n_layer=2, n_embd=128, seed=4), root / "rwkv7-g1x-tiny.pth")
    with running_app(["--model", str(path), "--device", "cpu"], root) as app:
        wait_until_loaded(app.url, path.name)
        yield app


def wait_until_loaded(url: str, model: str, key: str = KEY) -> None:
    client = openai.OpenAI(base_url=url + "v1", api_key=key, max_retries=0)
    for _ in range(240):
        try:
            client.completions.create(model=model, prompt="Hi", max_tokens=1)
            return
        except openai.APIStatusError as error:
            assert error.status_code == 503, error.message  # only "loading" while the model loads
            time.sleep(0.5)
    raise AssertionError("the model never finished loading")


def client(app, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=app.url + "v1", api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def ref_tokenizer():
    import rwkv
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
    return TRIE_TOKENIZER(os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt"))


def test_models_are_the_pickers(server):
    names = [model.id for model in client(server).models.list().data]
    assert names[0] == "tiny.pth" and "RWKV-7 G1 1.5B" in names and "RWKV-5 World 0.1B" in names


def test_a_resent_conversation_reads_only_its_new_tokens(server, ref_tokenizer):
    c = client(server)
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there"}]
    first = c.chat.completions.create(model="tiny.pth", messages=messages, max_tokens=8, seed=3)
    text = "You are terse.\n\nQuestion: Hello there\n\nAnswer:"  # the World template, system text as preamble
    assert first.usage.prompt_tokens == len(ref_tokenizer.encode(text))
    assert first.choices[0].message.role == "assistant" and first.choices[0].finish_reason in ("stop", "length")
    answer = first.choices[0].message.content
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And then?"}]
    second = c.chat.completions.create(model="tiny.pth", messages=messages, max_tokens=8, seed=3)
    new = len(ref_tokenizer.encode("\n\nQuestion: And then?\n\nAnswer:"))
    assert second.usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens - new
    assert second.usage.completion_tokens == len(ref_tokenizer.encode(" " + second.choices[0].message.content)) \
        or second.choices[0].finish_reason == "length"


def test_engine_processes_keep_each_resent_conversation_with_its_cached_state(tmp_path, ref_tokenizer):
    """--engine-processes 2: three clients at once resend their conversations; each second request finds all but
    its new message cached (it went to the process that answered the first), as with one process."""
    tiny = save_pth(make_state_dict("5.2", n_layer=2, n_embd=128, seed=1), tmp_path / "tiny.pth")
    results = {}

    def converse(app, name: str) -> None:
        c = client(app)
        messages = [{"role": "user", "content": f"{name}, hello there"}]
        first = c.chat.completions.create(model="tiny.pth", messages=messages, max_tokens=8, seed=3)
        messages += [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "And then?"}]
        results[name] = c.chat.completions.create(model="tiny.pth", messages=messages, max_tokens=8, seed=3)

    with running_app(["--model", str(tiny), "--device", "cpu", "--api-key", KEY, "--engine-processes", "2"],
                     tmp_path) as app:
        wait_until_loaded(app.url, "tiny.pth")
        threads = [threading.Thread(target=converse, args=(app, name)) for name in ("Ann", "Bob", "Cyd")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert "served by 2 engine processes" in app.log()
    new = len(ref_tokenizer.encode("\n\nQuestion: And then?\n\nAnswer:"))
    assert sorted(results) == ["Ann", "Bob", "Cyd"]
    for second in results.values():
        assert second.usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens - new


def test_streaming_equals_the_whole_answer_and_reports_usage(server):
    c = client(server)
    messages = [{"role": "user", "content": "Tell me a story."}]
    whole = c.chat.completions.create(model="tiny.pth", messages=messages, max_tokens=16, seed=5)
    chunks = list(c.chat.completions.create(model="tiny.pth", messages=messages, max_tokens=16, seed=5,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == whole.usage.prompt_tokens  # all cached now


def test_plain_completions_n_choices_and_stop_strings(server):
    c = client(server)
    out = c.completions.create(model="tiny.pth", prompt="The capital of France is", max_tokens=12, n=3, seed=1,
                               temperature=1.0, top_p=1.0)
    assert len(out.choices) == 3 and [choice.index for choice in out.choices] == [0, 1, 2]
    assert 3 <= out.usage.completion_tokens <= 3 * 12 and out.usage.prompt_tokens == 5  # "The capital of France is"
    assert all(choice.finish_reason in ("stop", "length") for choice in out.choices)
    long = c.completions.create(model="tiny.pth", prompt="The capital of France is", max_tokens=30, seed=2,
                                temperature=0)
    cut = long.choices[0].text[3:6]  # a piece of what it writes greedily: stopping there keeps what came before
    stopped = c.completions.create(model="tiny.pth", prompt="The capital of France is", max_tokens=30, seed=2,
                                   temperature=0, stop=[cut])
    assert stopped.choices[0].text == long.choices[0].text[:long.choices[0].text.index(cut)]
    assert stopped.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny.pth", prompt="The capital of France is", max_tokens=30, temperature=0, stream=True))
    assert streamed == long.choices[0].text


def test_concurrent_requests_all_get_their_own_answers(server):
    c = client(server)
    results, errors = {}, []

    def ask(i):
        try:
            out = c.chat.completions.create(model="tiny.pth", messages=[{"role": "user", "content": f"Q{i}"}],
                                            max_tokens=6, seed=i, temperature=0)
            results[i] = out.choices[0].message.content
        except openai.RateLimitError:
            errors.append(i)
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 3
    for i in range(3):  # alone, greedily, each gets the same answer
        alone = c.chat.completions.create(model="tiny.pth", messages=[{"role": "user", "content": f"Q{i}"}],
                                          max_tokens=6, temperature=0)
        assert alone.choices[0].message.content == results[i]


def test_every_error_has_openais_shape_and_status(server):
    c = client(server)
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").models.list()
    with pytest.raises(openai.NotFoundError, match="unknown model 'nope'"):
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    bad = [dict(temperature=9), dict(n=20), dict(messages=[]), dict(max_tokens=0),
           dict(messages=[{"role": "assistant", "content": "hi"}]), dict(messages=[{"role": "user", "content": "  "}]),
           dict(messages=[{"role": "user", "content": "x" * 16_001}]), dict(stop=["a"] * 5)]
    for change in bad:
        args = dict(model="tiny.pth", messages=[{"role": "user", "content": "x"}], max_tokens=4) | change
        with pytest.raises(openai.BadRequestError) as refused:
            c.chat.completions.create(**args)
        assert refused.value.body["message"], change
    request = urllib.request.Request(server.url + "v1/chat/completions", data=b"{not json",
                                     headers={"Authorization": f"Bearer {KEY}"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(request, timeout=30)
    body = json.loads(raw.value.read())
    assert raw.value.code == 400 and set(body["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.APIStatusError) as loading:  # a catalog model, not loaded (and offline): 503
        c.chat.completions.create(model="RWKV-7 G1 0.1B", messages=[{"role": "user", "content": "x"}])
    assert loading.value.status_code == 503


def test_too_many_waiting_requests_get_429(server):
    c = client(server)
    codes = []

    def ask():
        try:
            c.chat.completions.create(model="tiny.pth", messages=[{"role": "user", "content": "Go on"}],
                                      max_tokens=200, temperature=1.0)
            codes.append(200)
        except openai.RateLimitError:
            codes.append(429)
    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert codes.count(429) >= 1 and codes.count(200) >= 3  # --max-queue 3 requests are served at a time


def test_g1_reasoning_comes_apart_from_the_content(g1_server, ref_tokenizer):
    c = openai.OpenAI(base_url=g1_server.url + "v1", api_key="none", max_retries=0)  # no key needed here
    out = c.chat.completions.create(model="rwkv7-g1x-tiny.pth", max_tokens=8, seed=1,
                                    messages=[{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "Why?"}], extra_body={"think": "think"})
    text = "System: Be brief.\n\nUser: Why?\n\nAssistant: <think"
    assert out.usage.prompt_tokens == len(ref_tokenizer.encode(text))
    message = out.choices[0].message
    assert message.content == "" and message.model_extra["reasoning_content"]  # random weights never close it
    fake = c.chat.completions.create(model="rwkv7-g1x-tiny.pth", max_tokens=8, seed=1,
                                     messages=[{"role": "user", "content": "Why?"}])  # the G1 default: fake think
    assert fake.usage.prompt_tokens == len(ref_tokenizer.encode("User: Why?\n\nAssistant: <think></think"))
    assert "reasoning_content" not in (fake.choices[0].message.model_extra or {})


def test_a_client_that_disconnects_stops_its_generation(tmp_path):
    # plain completions run to max_tokens (no turn separator ends them), and this model is slow enough that
    # 2,048 tokens take far longer than the deadline below (about 20 s on 2 cores)
    slow = save_pth(make_state_dict("5.2", n_layer=4, n_embd=768, seed=1), tmp_path / "slow.pth")
    with running_app(["--model", str(slow), "--device", "cpu", "--max-queue", "2"], tmp_path) as app:
        wait_until_loaded(app.url, "slow.pth", key="none")
        c = client(app, key="none")
        for _ in range(2):  # as many long answers as --max-queue lets in, each left after its first chunk
            stream = c.completions.create(model="slow.pth", prompt="Once upon a time", max_tokens=2048,
                                          temperature=1.0, stream=True)
            next(iter(stream))
            stream.close()
        deadline = time.time() + 8
        while True:
            try:
                c.completions.create(model="slow.pth", prompt="Hi", max_tokens=1)
                break
            except openai.RateLimitError:
                assert time.time() < deadline, "the disconnected streams are still generating"
                time.sleep(0.2)


def test_cors_origins_are_the_operators_and_the_page_still_works(tmp_path):
    from gradio_client import Client
    tiny = save_pth(make_state_dict("5.2", n_layer=2, n_embd=128, seed=1), tmp_path / "tiny.pth")
    with running_app(["--model", str(tiny), "--device", "cpu", "--cors-origins", "https://ok.example"],
                     tmp_path) as app:
        wait_until_loaded(app.url, "tiny.pth", key="none")

        def preflight(origin):
            request = urllib.request.Request(app.url + "v1/chat/completions", method="OPTIONS", headers={
                "Origin": origin, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type"})
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    return response.headers.get("access-control-allow-origin")
            except urllib.error.HTTPError as error:
                return error.headers.get("access-control-allow-origin")
        assert preflight("https://ok.example") == "https://ok.example"
        assert preflight("https://evil.example") is None
        request = urllib.request.Request(app.url + "v1/models", headers={"Origin": "https://ok.example"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.headers.get("access-control-allow-origin") == "https://ok.example"
        with urllib.request.urlopen(app.url, timeout=30) as page:
            assert page.status == 200
        answer, stats = Client(app.url, verbose=False).predict("Hello", max_new_tokens=4, api_name="/chat")
        assert "prefill" in stats


@pytest.mark.parametrize("name, value, words", [
    ("temperature", "abc", "temperature must be a number, got 'abc'"),
    ("top_p", True, "top_p must be a number, got True"),
    ("temperature", 9, "temperature must be at most 5.0, got 9"),
    ("top_k", 2.5, "top_k must be a whole number, got 2.5"),
    ("penalty_decay", 1.5, "penalty_decay"),
])
def test_the_page_api_and_openai_refuse_a_setting_in_the_same_words(server, name, value, words):
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    with pytest.raises(AppError, match=re.escape(words)):
        Client(server.url, verbose=False).predict("x", **{name: value, "max_new_tokens": 4}, api_name="/chat")
    request = urllib.request.Request(
        server.url + "v1/chat/completions", method="POST",
        data=json.dumps({"model": "tiny.pth", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4,
                         name: value}).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    error = json.loads(refused.value.read())["error"]
    assert refused.value.code == 400 and words in error["message"] and error["param"] == name


def test_null_settings_mean_the_default_in_openai_and_are_refused_by_name_in_gradio_client(server):
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    with pytest.raises(AppError, match="top_p must be a number, got nothing"):
        Client(server.url, verbose=False).predict("x", top_p=None, max_new_tokens=4, api_name="/chat")
    answer = client(server).chat.completions.create(model="tiny.pth", messages=[{"role": "user", "content": "x"}],
                                                    max_tokens=4, temperature=None, top_p=None)
    assert answer.choices[0].finish_reason in ("length", "stop")
