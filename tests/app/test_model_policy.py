"""What a locked-down server lets visitors load: --models and --load-cooldown from flags, the environment and a
Space's defaults; the restricted model choices and the refusals the page, gradio_client's select_model and the
OpenAI API give for a model the operator does not offer; the load cooldown (with an injected clock, never by
sleeping). Mostly without a server; one real server (app_harness) checks what each client is told, and one start
checks that a bad --models stops it. Models are tiny random-weight checkpoints or fake engines; nothing is
downloaded (HF_HUB_OFFLINE)."""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time

import gradio as gr
import pytest
import torch

from rwkv_chat.app.chat_service import ChatService, SessionControl
from rwkv_chat.app.config import SPACE_LOAD_COOLDOWN_S, AppConfig, parse_config
from rwkv_chat.app.engine_factory import EngineFactory
from rwkv_chat.app.model_choices import (SMALL_DOWNLOAD_BYTES, ModelChoices, ModelKey, ModelListError,
                                         small_entries)
from rwkv_chat.app.model_pool import LoadCooldown, LoadRefused, ModelPool
from rwkv_chat.app.openai_api import ApiError, OpenAIApi
from rwkv_chat.loading.catalog import CATALOG, DEFAULT_MODEL
from rwkv_chat.loading.loader import DTYPES, ModelLoadError

SMALL_NAMES = [e.name for e in CATALOG if e.name.endswith(("0.1B", "0.4B"))]  # every download under 2 GB
SPACE = {"SPACE_ID": "user/space"}
GB = 10**9


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ---------------------------------------------------------------------------------------- settings

def test_locally_every_model_is_offered_and_loads_are_not_rate_limited():
    config = parse_config([], {})
    assert (config.models, config.load_cooldown) == (("all",), 0.0)
    assert AppConfig().models == ("all",) and AppConfig().load_cooldown == 0


def test_a_space_offers_small_models_and_loads_at_most_one_new_model_every_300_s():
    config = parse_config([], SPACE)
    assert (config.models, config.load_cooldown) == (("small",), SPACE_LOAD_COOLDOWN_S) == (("small",), 300)


def test_models_and_cooldown_come_from_flags_over_the_environment():
    env = {**SPACE, "RWKV_MODELS": "RWKV-7 G1 0.4B, small,", "RWKV_LOAD_COOLDOWN": "60"}
    config = parse_config([], env)
    assert (config.models, config.load_cooldown) == (("RWKV-7 G1 0.4B", "small"), 60)
    config = parse_config(["--models", "all", "--load-cooldown", "0"], env)
    assert (config.models, config.load_cooldown) == (("all",), 0)
    assert parse_config(["--models", " , "], {}).models == ("all",)  # nothing named: the default
    assert parse_config([], {"RWKV_MODELS": ""}).models == ("all",)


@pytest.mark.parametrize("seconds", ["-1", "nan", "1e9"])
def test_a_cooldown_out_of_bounds_is_refused_naming_the_setting(seconds):
    with pytest.raises(ValueError, match=r"--load-cooldown must be between 0 and 86400 seconds"):
        parse_config(["--load-cooldown", seconds], {})


# ---------------------------------------------------------------------------------------- choices

def total_memory(total: int):
    return lambda device: (total // 2, total)


def test_the_operators_model_is_always_offered_beside_the_models_named():
    choices = ModelChoices(DEFAULT_MODEL, ["rwkv-7-g1-0.4b", "RWKV-6 World 1.6B"])  # names as find_entry reads them
    assert [c.value for c in choices] == [DEFAULT_MODEL, "RWKV-6 World 1.6B", "RWKV-7 G1 0.4B"]
    assert [c.value for c in ModelChoices("RWKV-7 G1 0.4B", ["RWKV-7 G1 0.4B"])] == ["RWKV-7 G1 0.4B"]
    assert [c.value for c in ModelChoices(DEFAULT_MODEL, ["ALL"])] == [e.name for e in CATALOG]


def test_small_means_downloads_under_2_gb_in_half_the_devices_memory():
    assert all(e.file_bytes <= SMALL_DOWNLOAD_BYTES for e in CATALOG if e.name in SMALL_NAMES)
    roomy = ModelChoices("RWKV-5 World 3B", ["small"], "cpu", "fp32", total_memory(64 * GB))
    assert [c.value for c in roomy] == ["RWKV-5 World 3B"] + SMALL_NAMES  # no 1.5B (a 3 GB download), even here
    # 2.5 GB of RAM: half is 1.25 GB, room for a 0.4B model in bf16 (~1.2 GB) but not in fp32 (~1.9 GB)
    fp32 = [e.name for e in small_entries("cpu", "fp32", total_memory(int(2.5 * GB)))]
    bf16 = [e.name for e in small_entries("cpu", "bf16", total_memory(int(2.5 * GB)))]
    assert fp32 == [name for name in SMALL_NAMES if name.endswith("0.1B")] and bf16 == SMALL_NAMES
    assert small_entries("cpu", "fp32", total_memory(GB)) == ()
    if not torch.cuda.is_available():
        assert small_entries("cuda", "auto") == ()  # no GPU here: `small` adds nothing, --model is still offered
        assert [c.value for c in ModelChoices(DEFAULT_MODEL, ["small"], "cuda")] == [DEFAULT_MODEL]


def test_an_unknown_entry_in_models_is_a_start_up_error_naming_it_and_the_valid_names(tmp_path):
    with pytest.raises(ModelListError) as refused:
        ModelChoices(DEFAULT_MODEL, ["small", "RWKV-9 World 1B"])
    message = str(refused.value)
    assert "--models names 'RWKV-9 World 1B'" in message and "'all', 'small'" in message
    assert "RWKV-7 G1 0.4B" in message and "RWKV-4 World 7B" in message
    weights = tmp_path / "mine.pth"
    weights.write_bytes(b"0" * 10)
    assert [c.value for c in ModelChoices(str(weights), ["mine.pth", str(weights)])] == ["mine.pth"]  # naming --model

    from rwkv_chat.app.ui import build_app_or_exit
    with pytest.raises(SystemExit, match=r"^error: --models names 'nope', which is not a catalog model"):
        build_app_or_exit(AppConfig(model=DEFAULT_MODEL, device="cpu", models=("all", "nope")))


def test_a_catalog_model_left_out_is_refused_as_not_offered_and_what_is_offered_is_listed():
    choices = ModelChoices(DEFAULT_MODEL, ["RWKV-7 G1 0.4B"])
    with pytest.raises(ValueError) as refused:
        choices.resolve("RWKV-5 World 7B", "cpu", "bf16")
    assert str(refused.value) == ("this server does not offer 'RWKV-5 World 7B': its operator chose the models it "
                                  f"loads (--models); choose one of: {DEFAULT_MODEL}, RWKV-7 G1 0.4B")
    with pytest.raises(ValueError, match="unknown model '/etc/passwd'; choose one of: RWKV-5 World 0.1B, RWKV-7"):
        choices.resolve("/etc/passwd", "cpu", "fp32")


# ---------------------------------------------------------------------------------------- refusals

@pytest.fixture(scope="module")
def tiny(make_checkpoint):
    return make_checkpoint("5.2", n_layer=2, n_embd=128)


@pytest.fixture
def restricted(tiny):
    """A page, its API and the OpenAI API over the tiny model as --model and one catalog model offered."""
    from rwkv_chat.app.ui import ChatPage
    from rwkv_chat.app.ui_api import ChatApi
    choices = ModelChoices(str(tiny.path), ["RWKV-7 G1 0.1B"], "cpu", "fp32")
    pool = ModelPool(choices, EngineFactory(choices, batching=False), cooldown=LoadCooldown(300, lambda: 0.0))
    page = ChatPage(ChatService(pool), choices, AppConfig(model=str(tiny.path), device="cpu", dtype="fp32"))
    return page, ChatApi(page), OpenAIApi(pool, choices, "cpu", "fp32")


def test_the_page_and_the_api_refuse_a_model_the_operator_does_not_offer(restricted, tiny):
    page, api, _openai = restricted
    start = page.service.start(None)
    with pytest.raises(ValueError, match=f"does not offer 'RWKV-5 World 7B'.*--models.*{re.escape(tiny.path.name)}"):
        page.switch_model("RWKV-5 World 7B", "cpu", "fp32", start, SessionControl(), None)
    with pytest.raises(gr.Error, match=r"does not offer 'RWKV-4 World 0.1B'.*choose one of: .*RWKV-7 G1 0.1B"):
        api.select_model("RWKV-4 World 0.1B", "cpu", "fp32", start, SessionControl())
    status = page.ui_load("RWKV-5 World 7B", "cpu", "fp32", start, SessionControl())[3]
    assert "does not offer" in status and "--model /path" not in status  # a refusal, not a load to fix
    assert [row["name"] for row in api.list_models("cpu", "fp32")] == [tiny.path.name, "RWKV-7 G1 0.1B"]
    assert page.pool.loaded_keys() == []  # nothing was loaded (nor downloaded)
    status, conversation = api.select_model(tiny.path.name, "cpu", "fp32", start, SessionControl())
    assert "ready" in status and conversation.model == ModelKey(tiny.path.name, "cpu", "fp32")


def test_the_openai_api_answers_404_for_a_model_not_offered_and_lists_only_those_offered(restricted, tiny):
    _page, _api, openai = restricted
    with pytest.raises(ApiError) as refused:
        openai._model({"model": "RWKV-7 G1 7.2B"})
    error = refused.value
    assert (error.status, error.code, error.param) == (404, "model_not_found", "model")
    assert "does not offer 'RWKV-7 G1 7.2B'" in error.message and "RWKV-7 G1 0.1B" in error.message
    listed = asyncio.run(openai.models(None))
    assert [model["id"] for model in listed["data"]] == [tiny.path.name, "RWKV-7 G1 0.1B"]
    key, _choice = openai._model({"model": "rwkv-7-g1-0.1b"})
    assert key == ModelKey("RWKV-7 G1 0.1B", "cpu", "fp32")


# ---------------------------------------------------------------------------------------- cooldown

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeEngine:
    start_states = ()
    model_bytes = 8

    def close(self):
        pass


def cooled_pool(seconds: float, clock: Clock, calls: list, total: int = 10**13) -> ModelPool:
    """A pool of fake engines on a device of `total` bytes, less the estimates of the models it holds."""
    choices = ModelChoices(DEFAULT_MODEL)

    def factory(key, progress):
        calls.append(key.choice)
        return FakeEngine()

    def memory(device):
        used = sum(choices.get(k.choice).memory_bytes(DTYPES[k.dtype]) for k in pool.loaded_keys())
        return total - used, total

    pool = ModelPool(choices, factory, memory, LoadCooldown(seconds, clock))
    return pool


def key(name: str) -> ModelKey:
    return ModelKey(name, "cpu", "fp32")


def test_the_cooldown_message_names_the_setting_its_bound_and_the_seconds_left():
    clock = Clock()
    cooldown = LoadCooldown(300, clock)
    cooldown.check()
    cooldown.claim()
    clock.now += 100.4
    with pytest.raises(LoadRefused) as refused:
        cooldown.claim()
    assert str(refused.value).startswith("another model was loaded 100 s ago; this server loads a new model at "
                                         "most once every 300 s (--load-cooldown); try again in 200 s")
    assert refused.value.retry_after == 200 and isinstance(refused.value, ModelLoadError)
    clock.now += 199.6
    cooldown.claim()  # exactly 300 s later
    cooldown = LoadCooldown(0, clock)
    cooldown.claim()
    cooldown.claim()  # 0: no limit


def test_a_visitors_new_load_starts_the_cooldown_and_loaded_models_stay_usable():
    clock, calls = Clock(), []
    pool = cooled_pool(300, clock, calls)
    first = pool.get(key("RWKV-7 G1 0.1B"))
    clock.now += 10
    with pytest.raises(LoadRefused, match="loaded 10 s ago.*every 300 s \\(--load-cooldown\\); try again in 290 s"):
        pool.get(key("RWKV-4 World 0.1B"))
    assert pool.get(key("RWKV-7 G1 0.1B")) is first  # loaded: always served
    assert pool.error(key("RWKV-4 World 0.1B")) is None and not pool.is_loading(key("RWKV-4 World 0.1B"))
    with pytest.raises(LoadRefused):
        pool.preload(key("RWKV-4 World 0.1B"))  # a visitor's background load is refused at once
    clock.now += 290
    pool.get(key("RWKV-4 World 0.1B"))
    assert calls == ["RWKV-7 G1 0.1B", "RWKV-4 World 0.1B"]


def test_the_operators_preload_and_its_reloads_do_not_count():
    clock, calls = Clock(), []
    one_model = ModelChoices(DEFAULT_MODEL).get("RWKV-7 G1 0.1B").memory_bytes(torch.float32) * 3 // 2
    pool = cooled_pool(300, clock, calls, total=one_model)  # room for one 0.1B model at a time
    pool.preload(key(DEFAULT_MODEL), by_visitor=False).join(60)
    pool.get(key("RWKV-7 G1 0.1B"))  # the first visitor's load is not held up by the operator's; it evicts it
    assert pool.loaded_keys() == [key("RWKV-7 G1 0.1B")]
    pool.get(key(DEFAULT_MODEL))  # another visitor's chat brings the operator's model back: free
    assert pool.loaded_keys() == [key(DEFAULT_MODEL)]
    pool.preload(key(DEFAULT_MODEL)).join(60)  # loaded: nothing to do
    with pytest.raises(LoadRefused):
        pool.get(key("RWKV-7 G1 0.1B"))  # evicted by the reload: bringing it back is a new load, within 300 s
    with pytest.raises(LoadRefused):
        pool.get(ModelKey(DEFAULT_MODEL, "cpu", "bf16"))  # the operator's model in another placement counts
    assert calls == [DEFAULT_MODEL, "RWKV-7 G1 0.1B", DEFAULT_MODEL]


def test_a_load_refused_for_memory_does_not_start_the_cooldown():
    clock, calls = Clock(), []
    small = ModelChoices(DEFAULT_MODEL).get("RWKV-7 G1 0.1B").memory_bytes(torch.float32)
    pool = cooled_pool(300, clock, calls, total=small * 2)
    with pytest.raises(ModelLoadError, match="needs about"):
        pool.get(key("RWKV-5 World 7B"))
    pool.get(key("RWKV-7 G1 0.1B"))
    assert calls == ["RWKV-7 G1 0.1B"]


def test_concurrent_visitors_start_exactly_one_new_load():
    clock, calls = Clock(), []
    pool = cooled_pool(300, clock, calls)
    names = [e.name for e in CATALOG if e.name in SMALL_NAMES] * 2  # each key asked for twice
    barrier, outcomes, lock = threading.Barrier(len(names)), [], threading.Lock()

    def visit(name):
        barrier.wait()
        try:
            pool.get(key(name))
            outcome = name
        except LoadRefused:
            outcome = "refused"
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=visit, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(calls) == 1  # one load started; the other asker of that key shared it
    assert [o for o in outcomes if o != "refused"] == calls * 2 and outcomes.count("refused") == len(names) - 2


def test_the_openai_api_answers_429_with_the_seconds_left_while_the_cooldown_runs(restricted, tiny):
    page, _api, openai = restricted
    pool = page.pool
    pool.get(ModelKey(tiny.path.name, "cpu", "fp32"))  # a visitor's load at t=0 (the clock stands still)
    with pytest.raises(ApiError) as refused:
        openai._engine(ModelKey("RWKV-7 G1 0.1B", "cpu", "fp32"))
    error = refused.value
    assert (error.status, error.code, error.headers) == (429, "model_load_cooldown", {"Retry-After": "300"})
    assert "--load-cooldown" in error.message
    assert openai._engine(ModelKey(tiny.path.name, "cpu", "fp32")) is not None  # loaded: served
    assert page.ui_load("RWKV-7 G1 0.1B", "cpu", "fp32", page.service.start(None), SessionControl())[3].startswith(
        "⚠️ Could not load **RWKV-7 G1 0.1B**: another model was loaded 0 s ago")


# ---------------------------------------------------------------------------------------- end to end

def test_a_locked_down_server_refuses_through_gradio_client_and_the_openai_api(tiny, tmp_path):
    """`python app.py --models ... --load-cooldown 300`: what each client is told (no download is attempted)."""
    import openai
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from app_harness import running_app
    args = ["--model", str(tiny.path), "--device", "cpu", "--models", "RWKV-7 G1 0.1B", "--load-cooldown", "300"]
    with running_app(args, tmp_path, env={"RWKV_DATA_DIR": str(tmp_path / "data")}) as app:
        c = Client(app.url, verbose=False)
        for _ in range(240):  # the operator's preload (which does not count) ends
            rows = c.predict("cpu", "fp32", api_name="/list_models")
            if rows[0]["loaded"]:
                break
            time.sleep(0.5)
        assert [row["name"] for row in rows] == [tiny.path.name, "RWKV-7 G1 0.1B"] and rows[0]["loaded"]
        with pytest.raises(AppError, match=r"does not offer 'RWKV-5 World 7B'.*--models.*RWKV-7 G1 0.1B"):
            c.predict("RWKV-5 World 7B", "cpu", "fp32", api_name="/select_model")
        v1 = openai.OpenAI(base_url=app.url + "v1", api_key="none", max_retries=0)
        with pytest.raises(openai.NotFoundError, match="does not offer 'RWKV-5 World 7B'"):
            v1.completions.create(model="RWKV-5 World 7B", prompt="Hi", max_tokens=1)
        # a visitor's load (the operator's model in another precision) starts the cooldown...
        assert "ready" in c.predict(tiny.path.name, "cpu", "bf16", api_name="/select_model")
        with pytest.raises(AppError, match=r"at most once every 300 s \(--load-cooldown\); try again in"):
            c.predict("RWKV-7 G1 0.1B", "cpu", "fp32", api_name="/select_model")
        with pytest.raises(openai.RateLimitError, match="--load-cooldown") as refused:
            v1.completions.create(model="RWKV-7 G1 0.1B", prompt="Hi", max_tokens=1)
        assert 290 <= int(refused.value.response.headers["retry-after"]) <= 300
        # ...and models already loaded stay usable
        assert v1.completions.create(model=tiny.path.name, prompt="Hi", max_tokens=1).choices


def test_an_unknown_name_in_models_stops_the_start_with_the_valid_names(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RWKV_DATA_DIR": str(tmp_path), "RWKV_MODELS": "small,RWKV-9 1B"}
    done = subprocess.run([sys.executable, "app.py", "--device", "cpu"], cwd=Path(__file__).resolve().parents[2],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(
        "error: --models names 'RWKV-9 1B', which is not a catalog model; use 'all', 'small', 'none' (only --model) or catalog names")


def test_none_offers_only_the_operators_model(tmp_path):
    weights = tmp_path / "mine.pth"
    weights.write_bytes(b"0" * 1000)
    assert [choice.value for choice in ModelChoices(str(weights), ("none",))] == ["mine.pth"]
    with pytest.raises(ValueError, match="this server does not offer 'RWKV-7 G1 0.1B'"):
        ModelChoices(str(weights), ("none",)).resolve("RWKV-7 G1 0.1B", "cpu", "fp32")
