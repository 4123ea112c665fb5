"""The app's parts without a server: flags/env, the model choices and their memory lines, the LRU model pool
(with a fake loader and a fake memory probe), and the chat service on a tiny real model."""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import pytest
import torch

from rwkv_chat import limits
from rwkv_chat.app.config import AppConfig, parse_config
from rwkv_chat.loading.catalog import CATALOG, DEFAULT_MODEL, get_entry, suggested_model
from rwkv_chat.app.chat_service import Busy, ChatService, ChatSettings, SessionControl
from rwkv_chat.app.engine_factory import EngineFactory
from rwkv_chat.loading.loader import DTYPES, ModelLoadError
from rwkv_chat.app.model_choices import ModelChoices, ModelKey, describe
from rwkv_chat.app.model_pool import ModelPool


# ---------------------------------------------------------------------------------------- config

def test_defaults_serve_the_default_model_on_loopback():
    expected = DEFAULT_MODEL if not torch.cuda.is_available() else parse_config([], {}).model
    assert parse_config([], {}) == AppConfig(model=expected, server_name="127.0.0.1", port=7860,
                                             data_dir=str(Path.home() / ".cache" / "rwkv-chat"))
    assert parse_config(["--device", "cpu"], {}).model == DEFAULT_MODEL


def test_a_g1_model_is_suggested_on_a_gpu_and_rwkv5_01b_on_a_cpu():
    gib = 1024 ** 3
    assert suggested_model(None) == "RWKV-5 World 0.1B"
    assert suggested_model(80 * gib) == "RWKV-7 G1 2.9B"
    assert suggested_model(8 * gib) == "RWKV-7 G1 1.5B"
    assert suggested_model(4 * gib) == "RWKV-7 G1 0.4B"
    for name in ("RWKV-7 G1 2.9B", "RWKV-7 G1 1.5B"):  # what is suggested fits in half the card it is suggested for
        assert get_entry(name).memory_bytes(torch.bfloat16) <= {"RWKV-7 G1 2.9B": 80, "RWKV-7 G1 1.5B": 8}[name] * gib


def test_flags_win_over_environment_which_wins_over_defaults():
    env = {"RWKV_MODEL": "RWKV-4 World 0.4B", "RWKV_DEVICE": "cpu", "RWKV_DTYPE": "bf16", "PORT": "9000",
           "GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SHARE": "true", "RWKV_CONCURRENCY": "3",
           "RWKV_PREAMBLE": "Be brief."}
    config = parse_config([], env)
    assert (config.model, config.device, config.dtype, config.port, config.server_name, config.share,
            config.concurrency, config.preamble) == ("RWKV-4 World 0.4B", "cpu", "bf16", 9000, "0.0.0.0", True, 3,
                                                     "Be brief.")
    config = parse_config(["--model", "/models/x.pth", "--port", "8001", "--dtype", "fp16", "--server-name",
                           "127.0.0.1", "--concurrency", "5", "--share"], env)
    assert (config.model, config.port, config.dtype, config.server_name, config.concurrency) == \
        ("/models/x.pth", 8001, "fp16", "127.0.0.1", 5)
    assert parse_config([], {"GRADIO_SERVER_PORT": "7000", "PORT": "9000"}).port == 7000


def test_concurrency_and_queue_default_to_auto_and_an_explicit_value_wins_or_is_refused_clearly(capsys):
    assert (parse_config([], {}).concurrency, parse_config([], {}).max_queue) == (None, None)  # auto
    assert parse_config(["--concurrency", "auto"], {"RWKV_CONCURRENCY": "7"}).concurrency is None
    assert parse_config([], {"RWKV_CONCURRENCY": "auto"}).concurrency is None
    sized = parse_config([], {}).sized(100)
    assert (sized.concurrency, sized.max_queue) == (100, 200)  # the queue holds two waiting requests per chat
    assert parse_config([], {}).sized(4).max_queue == 64  # and never fewer than 64
    assert parse_config([], {}).sized(10_000).concurrency == 256
    explicit = parse_config(["--concurrency", "12", "--max-queue", "5"], {}).sized(256)
    assert (explicit.concurrency, explicit.max_queue) == (12, 5)
    for value in ("0", "257"):  # the command line says why and exits, like any bad flag
        with pytest.raises(SystemExit):
            parse_config(["--concurrency", value], {})
        assert "--concurrency must be between 1 and 256 chats" in capsys.readouterr().err
        with pytest.raises(ValueError, match=f"--concurrency must be between 1 and 256 .*got {value}"):
            AppConfig(concurrency=int(value))
    with pytest.raises(SystemExit):  # an environment variable too: its name and value, no traceback
        parse_config([], {"RWKV_CONCURRENCY": "many"})
    assert "error: RWKV_CONCURRENCY takes a whole number or 'auto', not 'many'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(["--concurrency", "many"], {})


@pytest.mark.parametrize("name, value, says", [
    ("RWKV_KEEP_DAYS", "a month", "RWKV_KEEP_DAYS takes a number, not 'a month'"),
    ("RWKV_DRAIN_SECONDS", "8s", "RWKV_DRAIN_SECONDS takes a number, not '8s'"),
    ("RWKV_STATS_EVERY", "often", "RWKV_STATS_EVERY takes a number, not 'often'"),
    ("RWKV_LOAD_COOLDOWN", "5m", "RWKV_LOAD_COOLDOWN takes a number, not '5m'"),
    ("PORT", "http", "PORT takes a whole number, not 'http'"),
    ("GRADIO_SERVER_PORT", "7860.5", "GRADIO_SERVER_PORT takes a whole number, not '7860.5'"),
    ("RWKV_ENGINE_PROCESSES", "many", "RWKV_ENGINE_PROCESSES takes a whole number or 'auto', not 'many'"),
])
def test_a_bad_number_in_the_environment_names_the_variable(name, value, says, capsys):
    with pytest.raises(SystemExit) as stopped:
        parse_config([], {name: value})
    assert stopped.value.code == 2 and says in capsys.readouterr().err
    assert parse_config([], {name: ""}) == parse_config([], {})  # an empty variable is the default


def test_auto_concurrency_follows_the_states_the_device_holds_beside_the_model():
    """On a GPU (device probe and placement faked) the chats' states, STATE_COPIES_PER_CHAT copies of the
    RwkvState each, fit in the share of free memory left beside the model; a CPU gets a few."""
    from rwkv_chat.app import model_pool
    from rwkv_chat.app.model_pool import CAPACITY_SHARE, CPU_CHATS, STATE_COPIES_PER_CHAT, chat_capacity
    gb = 10**9
    choice = ModelChoices("RWKV-5 World 7B", ("none",)).default
    assert chat_capacity(choice, "cpu", "fp32") == CPU_CHATS
    state = choice.entry.state_bytes()
    need = choice.memory_bytes(torch.bfloat16)

    def on_gpu(free):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(model_pool, "resolve_device_dtype", lambda d, t: (torch.device("cuda"), torch.bfloat16))
            return chat_capacity(choice, "cuda", "bf16", memory=lambda device: (free, 143 * gb))
    counts = [on_gpu(free) for free in (need // 2, need + 2 * gb, 60 * gb, 140 * gb, 10**15)]
    assert counts == sorted(counts) and counts[0] == 1 and counts[-1] == 256
    for free, chats in zip((need + 2 * gb, 60 * gb, 140 * gb), counts[1:4]):
        assert chats * STATE_COPIES_PER_CHAT * state <= (free - need) * CAPACITY_SHARE  # they fit
        assert chats == 256 or 2 * chats * STATE_COPIES_PER_CHAT * state > (free - need) * CAPACITY_SHARE


@pytest.mark.parametrize("version", ["5.2", "7"])
def test_an_operators_pth_file_gives_its_chat_state_size_before_it_loads(make_checkpoint, tmp_path, version):
    """The capacity of a local checkpoint comes from its tensor shapes (the state the loaded model really has),
    not the fixed guess used for what cannot be read before loading (here a file that is no checkpoint)."""
    from rwkv_chat import load_model
    from rwkv_chat.app import model_pool
    from rwkv_chat.app.model_pool import GPU_CHATS_UNKNOWN, chat_capacity
    path = make_checkpoint(version, n_layer=3, n_embd=128, seed=5).path
    choice = ModelChoices(str(path), ("none",)).default
    assert choice.entry is None
    assert choice.state_bytes() == load_model(path, device="cpu", dtype="fp32").zero_state(1).nbytes
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"0" * 1000)
    unknown = ModelChoices(str(junk), ("none",)).default
    assert unknown.state_bytes() is None
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model_pool, "resolve_device_dtype", lambda d, t: (torch.device("cuda"), torch.bfloat16))
        free = lambda device: (100 * 10**9, 143 * 10**9)  # noqa: E731
        assert chat_capacity(unknown, "cuda", "bf16", memory=free) == GPU_CHATS_UNKNOWN
        assert chat_capacity(choice, "cuda", "bf16", memory=free) == 256  # a tiny state: the most there is


def test_a_space_listens_on_all_interfaces_and_unknown_flags_are_ignored():
    assert parse_config(["--reload"], {"SPACE_ID": "user/space"}).server_name == "0.0.0.0"
    with pytest.raises(SystemExit):
        parse_config(["--device", "tpu"], {})


# ---------------------------------------------------------------------------------------- choices

def test_choices_are_the_catalog_plus_the_operators_file(tmp_path):
    weights = tmp_path / "mine.pth"
    weights.write_bytes(b"0" * 1000)
    choices = ModelChoices(str(weights))
    assert [c.value for c in choices] == ["mine.pth"] + [e.name for e in CATALOG]
    assert choices.default.value == "mine.pth" and choices.default.source == str(weights)
    assert choices.default.download_bytes == 1000
    assert [c.value for c in ModelChoices("rwkv-5-world-0.1b")] == [e.name for e in CATALOG]


def test_resolve_refuses_anything_not_offered(tmp_path):
    choices = ModelChoices(DEFAULT_MODEL)
    for name in ("/etc/passwd", str(tmp_path), "RWKV/rwkv-5-world-169m", "RWKV-8 World 1.6B"):
        with pytest.raises(ValueError, match="unknown model"):
            choices.resolve(name, "cpu", "fp32")
    assert choices.resolve("rwkv-4-world-0.4b", "cpu", "bf16") == ModelKey("RWKV-4 World 0.4B", "cpu", "bf16")
    assert choices.resolve(DEFAULT_MODEL, "cpu", "auto").dtype == "fp32"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu_is_a_clear_load_error():
    with pytest.raises(ModelLoadError, match="no CUDA GPU"):
        ModelChoices(DEFAULT_MODEL).resolve(DEFAULT_MODEL, "cuda", "auto")


def test_picker_lines_show_download_memory_and_fit(monkeypatch):
    import rwkv_chat.app.model_choices as model_choices
    monkeypatch.setattr(model_choices, "free_memory", lambda device: (8 * 10**9, 16 * 10**9))
    choices = ModelChoices(DEFAULT_MODEL)
    small, big = choices.get("RWKV-5 World 0.1B"), choices.get("RWKV-5 World 7B")
    line = describe(small, "cpu", "fp32")
    assert line.startswith("RWKV-5 World 0.1B · 0.39 GB download · needs ") and line.endswith("fp32 · fits")
    assert describe(big, "cpu", "bf16").endswith("too big (8.00 GB RAM free)")
    assert describe(big, "cpu", "bf16", reclaimable=10 * 10**9).endswith("fits")
    assert describe(small, "cpu", "fp32", loaded=True).endswith("loaded on cpu fp32")
    assert f"{get_entry('RWKV-5 World 7B').memory_bytes(torch.bfloat16) / 1e9:.0f} GB" in describe(big, "cpu", "bf16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine: int4 is refused there, not cuda
    assert describe(small, "cuda", "int4").endswith("download · int4 runs on CPUs only")


# ---------------------------------------------------------------------------------------- pool

class FakeEngine:
    start_states = ()
    model_bytes = 8

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.closed = False

    def close(self):
        self.closed = True


class FakeMachine:
    """A device with `total` bytes, minus the estimated memory of every model the pool holds."""

    def __init__(self, pool_choices: ModelChoices, total: int):
        self.choices, self.total, self.pool = pool_choices, total, None

    def __call__(self, device):
        used = sum(self.choices.get(k.choice).memory_bytes(DTYPES[k.dtype]) for k in self.pool.loaded_keys())
        return self.total - used, self.total


def make_pool(total: int, calls: list, fail: set = frozenset()):
    choices = ModelChoices(DEFAULT_MODEL)

    def factory(key, progress):
        calls.append(key)
        progress("placing")
        if key.choice in fail:
            raise ModelLoadError(f"cannot get {key.choice}")
        return FakeEngine(1)

    machine = FakeMachine(choices, total)
    pool = ModelPool(choices, factory, machine)
    machine.pool = pool
    return pool


def key(name: str) -> ModelKey:
    return ModelKey(name, "cpu", "fp32")


def test_pool_keeps_models_and_evicts_the_least_recently_used():
    a, b = key("RWKV-5 World 0.1B"), key("RWKV-4 World 0.1B")
    c = ModelKey("RWKV-5 World 0.1B", "cpu", "bf16")
    need = {k: ModelChoices(DEFAULT_MODEL).get(k.choice).memory_bytes(DTYPES[k.dtype]) for k in (a, b, c)}
    calls = []
    pool = make_pool(need[a] + need[b] + need[c] // 2, calls)  # room for a and b, not for a third
    engine_a, engine_b = pool.get(a), pool.get(b)
    assert pool.get(a) is engine_a and calls == [a, b]  # loaded models are reused
    pool.get(c)  # b is the least recently used: it goes, and its batcher is closed
    assert pool.loaded_keys() == [a, c] and engine_b.closed and not engine_a.closed
    with pytest.raises(ModelLoadError, match="needs about"):
        pool.get(key("RWKV-5 World 3B"))  # could never fit: refused, and nothing is evicted
    assert pool.loaded_keys() == [a, c]


def test_pool_loads_a_key_once_for_concurrent_askers_and_remembers_errors():
    calls = []
    pool = make_pool(10**13, calls, fail={"RWKV-4 World 3B"})
    engines = []
    threads = [threading.Thread(target=lambda: engines.append(pool.get(key("RWKV-5 World 0.1B"))))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len({id(e) for e in engines}) == 1
    stages = []
    with pytest.raises(ModelLoadError):
        pool.get(key("RWKV-4 World 3B"), stages.append)
    assert stages == ["placing"] and pool.error(key("RWKV-4 World 3B")) == "cannot get RWKV-4 World 3B"
    assert pool.peek(key("RWKV-4 World 3B")) is None


def test_a_slow_load_does_not_hold_up_models_already_loaded():
    release, started = threading.Event(), threading.Event()
    choices = ModelChoices(DEFAULT_MODEL)

    def factory(key, progress):
        if key.choice == "RWKV-5 World 7B":
            started.set()
            release.wait(60)
        return FakeEngine(1)

    pool = ModelPool(choices, factory, lambda device: (10**13, 10**13))
    ready = pool.get(key("RWKV-5 World 0.1B"))
    loader = threading.Thread(target=pool.get, args=(key("RWKV-5 World 7B"),))
    loader.start()
    assert started.wait(60)
    assert pool.is_loading(key("RWKV-5 World 7B"))
    assert pool.get(key("RWKV-5 World 0.1B")) is ready  # answered while the other load is still running
    release.set()
    loader.join(60)
    assert not pool.is_loading(key("RWKV-5 World 7B")) and pool.peek(key("RWKV-5 World 7B")) is not None


def test_the_state_cache_keeps_two_states_for_every_chat_that_can_generate_at_once(make_checkpoint):
    """A server for many chats gets a prefix cache that holds each one's state after its prompt and after its
    reply (so a next turn reads only its own tokens), and never less than the fixed budget."""
    from rwkv_chat.app.engine_factory import CACHED_STATES_PER_CHAT
    path = make_checkpoint("5.2", n_layer=2, n_embd=128, seed=4).path
    choices = ModelChoices(str(path), ("none",))
    key = choices.resolve(choices.default.value, "cpu", "fp32")
    for chats in (8, 20_000):
        engine = EngineFactory(choices, max_batch=chats, batching=False)(key, lambda message: None)
        states = CACHED_STATES_PER_CHAT * chats * engine.model.zero_state(1).nbytes
        assert engine.cache.max_bytes == max(limits.STATE_CACHE_BYTES, states)
    assert states > limits.STATE_CACHE_BYTES  # the larger server's cache grew past the fixed budget


def test_a_batching_engine_prints_its_decoding_while_chats_generate(make_checkpoint, capsys):
    """With stats_every the batcher's work comes out as lines of the server's output (tokens/s, the mean batch,
    where a step's time goes), only while something generates; without it, nothing."""
    import time
    from rwkv_chat.serving.batching import DecodeBatcher
    from rwkv_chat.serving.engine import GenerationSettings
    from rwkv_chat.serving.sampling import SamplingParams
    from rwkv_chat.serving.session import ChatSession
    path = make_checkpoint("5.2", n_layer=2, n_embd=128, seed=4).path
    choices = ModelChoices(str(path), ("none",))
    key = choices.resolve(choices.default.value, "cpu", "fp32")
    greedy = GenerationSettings(SamplingParams(temperature=0.0), 40)
    for every in (0.05, 0.0):
        engine = EngineFactory(choices, max_batch=4, stats_every=every)(key, lambda message: None)
        assert isinstance(engine.decoder, DecodeBatcher)
        try:
            list(engine.reply(ChatSession(), "Hello", greedy))
            time.sleep(0.2)  # the last window is reported
            out = capsys.readouterr().out
            time.sleep(0.2)  # idle: nothing more
            assert capsys.readouterr().out == ""
        finally:
            engine.decoder.close()
        lines = [line for line in out.splitlines() if " decode " in line]
        if every:
            assert lines and all(line.startswith(f"rwkv-chat: {engine.label}: decode ") for line in lines)
            assert all("tokens/s, mean batch 1.0; ms a step" in line for line in lines)
        else:
            assert not lines
    with pytest.raises(ValueError, match="--stats-every must be between 0 .off. and 86400 seconds, got -1"):
        AppConfig(stats_every=-1)
    assert parse_config(["--stats-every", "5"], {}).stats_every == 5
    assert parse_config([], {"RWKV_STATS_EVERY": "0"}).stats_every == 0
    assert parse_config([], {}).stats_every == 60


def test_engine_processes_are_a_cpu_setting_counted_in_memory_and_concurrency(make_checkpoint):
    """--engine-processes N: a CPU model is built in N processes (a GPU keeps one), the pool counts N copies of
    its memory, the auto concurrency grows by CPU_CHATS for each, and a bad count names the flag and its bounds."""
    from rwkv_chat.app.model_pool import CPU_CHATS, chat_capacity
    from rwkv_chat.app.process_memory import TRIM_SECONDS
    from rwkv_chat.serving.engine_processes import EngineProcesses
    path = make_checkpoint("5.2", n_layer=2, n_embd=128, seed=4).path
    choices = ModelChoices(str(path), ("none",))
    key = choices.resolve(choices.default.value, "cpu", "fp32")
    factory = EngineFactory(choices, max_batch=4, processes=2)
    assert factory.copies(key) == 2 and factory.copies(ModelKey(key.choice, "cuda", "bf16")) == 1
    # engine processes trim their own heaps, as serve() does for the server's process (which trims itself)
    assert factory.recipe(key).trim_every == TRIM_SECONDS and EngineFactory(choices).recipe(key).trim_every == 0
    pool = ModelPool(choices, factory, lambda device: (10**13, 10**13))
    engine = pool.get(key)
    try:
        assert isinstance(engine, EngineProcesses) and engine.processes == 2
        one = EngineFactory(choices, batching=False)(key, lambda message: None)
        assert engine.model_bytes == 2 * one.model_bytes
        assert pool._need(key) == 2 * choices.get(key.choice).memory_bytes(torch.float32)  # a .pth's shapes: known
    finally:
        pool.close()
    assert engine.processes == 0  # closed with the pool
    assert chat_capacity(choices.default, "cpu", "fp32", processes=3) == 3 * CPU_CHATS
    assert parse_config(["--engine-processes", "3"], {}).engine_processes == 3
    assert parse_config([], {"RWKV_ENGINE_PROCESSES": "2"}).engine_processes == 2
    assert parse_config([], {}).engine_processes is None  # auto
    assert parse_config(["--engine-processes", "auto"], {"RWKV_ENGINE_PROCESSES": "2"}).engine_processes is None
    assert parse_config([], {"RWKV_ENGINE_PROCESSES": "AUTO"}).engine_processes is None
    with pytest.raises(ValueError, match="--engine-processes must be between 1 and 64 processes serving a CPU "
                                         "model, or auto"):
        AppConfig(engine_processes=0)
    with pytest.raises(SystemExit):
        parse_config(["--engine-processes", "65"], {})


def test_auto_engine_processes_follow_the_threads_the_model_and_the_memory(make_checkpoint):
    """--engine-processes auto: for a small model one process per THREADS_PER_PROCESS torch threads, no more copies
    than AUTO_MEMORY_SHARE of the available RAM holds; one for a larger model, one whose size is unknown, one on a
    GPU; settled once per model, and the auto concurrency counts the processes that will serve the operator's
    model."""
    from rwkv_chat.app.engine_factory import (AUTO_MEMORY_SHARE, AUTO_SMALL_MODEL_BYTES, THREADS_PER_PROCESS,
                                              auto_engine_processes, engine_process_count)
    from rwkv_chat.app.model_pool import CPU_CHATS
    from rwkv_chat.app.ui import sized_config
    from rwkv_chat.loading.catalog import CATALOG
    gb, small = 10**9, AUTO_SMALL_MODEL_BYTES
    assert THREADS_PER_PROCESS == 4 and AUTO_MEMORY_SHARE == 0.5
    assert auto_engine_processes(2, small, 100 * gb) == 1  # a 2-core Space or CI machine: one process
    assert auto_engine_processes(7, small, 100 * gb) == 1
    assert auto_engine_processes(8, small, 100 * gb) == 2
    assert auto_engine_processes(16, small, 100 * gb) == 4
    assert auto_engine_processes(16, small, 6 * small) == 3  # three copies in half of six copies' worth
    assert auto_engine_processes(16, small, small) == 1  # not even one fits half: still one (the pool decides)
    assert auto_engine_processes(16, small + 1, 100 * gb) == 1  # a larger model: its lone user keeps every thread
    assert auto_engine_processes(16, None, 100 * gb) == 1  # a hub id whose size is unknown before it loads
    assert auto_engine_processes(1024, 1, 100 * gb) == 64
    # which catalog models count as small: the 0.1B ones in int8 and int4, nothing larger, no fp32 or bf16 model
    small_ones = {(entry.name, dtype) for entry in CATALOG for dtype in (torch.float32, torch.bfloat16, torch.int8)
                  if entry.memory_bytes(dtype) <= AUTO_SMALL_MODEL_BYTES}
    assert small_ones and all("0.1B" in name and dtype == torch.int8 for name, dtype in small_ones)
    assert all(entry.memory_bytes(torch.int8) <= AUTO_SMALL_MODEL_BYTES for entry in CATALOG if "0.1B" in entry.name)

    path = make_checkpoint("5.2", n_layer=2, n_embd=128, seed=4).path
    choices = ModelChoices(str(path), ("none",))
    need = choices.default.memory_bytes(torch.float32)
    assert need <= AUTO_SMALL_MODEL_BYTES
    plenty = lambda device: (100 * need, 100 * need)  # noqa: E731
    assert engine_process_count(choices.default, "cpu", "fp32", None, threads=16, memory=plenty) == 4
    assert engine_process_count(choices.default, "cpu", "int8", None, threads=16,
                                memory=lambda device: (5 * need, 5 * need)) == 4  # int8 copies are smaller
    assert engine_process_count(choices.default, "cpu", "fp32", None, threads=16,
                                memory=lambda device: (5 * need, 5 * need)) == 2
    assert engine_process_count(choices.default, "cpu", "fp32", 3, threads=16, memory=plenty) == 3  # as set
    assert engine_process_count(choices.default, "cuda", "bf16", None, threads=16, memory=plenty) == 1
    assert engine_process_count(choices.default, "cuda", "bf16", 3, threads=16, memory=plenty) == 1

    memory = [100 * need]
    factory = EngineFactory(choices, processes=None, threads=16, memory=lambda device: (memory[0], memory[0]))
    key = choices.resolve(choices.default.value, "cpu", "fp32")
    assert factory.copies(key) == 4 and factory.copies(ModelKey(key.choice, "cuda", "bf16")) == 1
    memory[0] = need  # settled at the first ask: the load places what the pool's memory check counted
    assert factory.copies(key) == 4

    config = AppConfig(model=str(path), device="cpu", dtype="fp32", engine_processes=3)
    assert sized_config(config, choices).concurrency == 3 * CPU_CHATS
    config = AppConfig(model=str(path), device="cpu", dtype="fp32")  # auto: as many as will serve it here
    expected = engine_process_count(choices.default, "cpu", "fp32", None)
    assert sized_config(config, choices).concurrency == expected * CPU_CHATS


# ---------------------------------------------------------------------------------------- service

@pytest.fixture(scope="module")
def service(make_checkpoint):
    tiny = make_checkpoint("5.2", n_layer=2, n_embd=128)
    choices = ModelChoices(str(tiny.path))
    pool = ModelPool(choices, EngineFactory(choices, batching=False))
    return ChatService(pool), choices.resolve(choices.default.value, "cpu", "fp32")


def finish(updates):
    *_, last = list(updates)
    assert last.done
    return last


def stats_prefill(conversation) -> int:
    return int(conversation.stats.split("prefill ")[1].split(" tok")[0])


def test_a_shared_preamble_is_read_once_and_counted_where_it_is_read(service):
    chat, model = service
    tokenizer = chat.pool.get(model).tokenizer
    settings = ChatSettings(max_new_tokens=5, seed=1, preamble="You are a terse assistant.")
    first = finish(chat.reply(chat.start(model, settings), "Hi", settings)).conversation
    preamble = len(tokenizer.encode("You are a terse assistant.\n\n"))
    turn = len(tokenizer.encode("Question: Hi\n\nAnswer:"))
    assert stats_prefill(first) == preamble + turn
    second = finish(chat.reply(chat.start(model, settings), "Hi", settings)).conversation
    assert stats_prefill(second) == 0  # the same preamble and question: everything came from the cache
    third = finish(chat.reply(chat.start(model, settings), "Hello", settings)).conversation
    assert stats_prefill(third) == len(tokenizer.encode("Question: Hello\n\nAnswer:"))


def test_the_app_loads_its_models_on_the_fast_path_even_in_fp32_on_a_cpu(service):
    chat, model = service
    assert model.dtype == "fp32" and chat.pool.get(model).model.runner is not None


def test_changing_the_prompt_style_starts_a_new_conversation(service):
    chat, model = service
    settings = ChatSettings(max_new_tokens=5, seed=1)
    conversation = finish(chat.reply(chat.start(model), "One", settings)).conversation
    updates = list(chat.reply(conversation, "Two", ChatSettings(max_new_tokens=5, prompt_style="User/Assistant")))
    assert updates[-1].notice.startswith("new conversation")
    assert updates[-1].conversation.session.template == "User/Assistant"
    assert [m for m, _ in updates[-1].conversation.history()] == ["Two"]


def test_refused_settings_name_the_setting():
    with pytest.raises(ValueError, match="temperature"):
        ChatSettings(temperature=limits.MAX_TEMPERATURE + 1).generation()
    with pytest.raises(ValueError, match="max new tokens"):
        ChatSettings(max_new_tokens=limits.MAX_NEW_TOKENS + 1).generation()
    with pytest.raises(ValueError, match="top_k"):
        ChatSettings(top_k=2.5).generation()
    with pytest.raises(ValueError, match="prompt style"):
        ChatSettings(prompt_style="Bob/Alice").session_style()
    assert ChatSettings(seed=-1).generation().seed is None and ChatSettings(seed=4).generation().seed == 4


def test_each_session_gets_its_own_control_and_one_answer_at_a_time():
    control = SessionControl()
    fresh = copy.deepcopy(control)
    assert fresh is not control and fresh.stop_event is not control.stop_event
    with control.generating() as stop:
        control.request_stop()
        assert stop.is_set() and control.busy and not fresh.busy
        with pytest.raises(Busy):
            with control.generating():
                pass
    with control.generating() as stop:
        assert not stop.is_set()  # a new answer starts without the old stop request


def test_int8_is_offered_and_placed_as_int8():
    assert parse_config(["--dtype", "int8"]).dtype == "int8"
    assert ModelChoices(DEFAULT_MODEL).resolve(DEFAULT_MODEL, "cpu", "int8") == ModelKey(DEFAULT_MODEL, "cpu", "int8")
    entry = get_entry(DEFAULT_MODEL)
    assert entry.memory_bytes(torch.int8) < entry.memory_bytes(torch.bfloat16)


def test_a_model_that_fails_to_load_from_the_picker_is_reported_and_the_session_keeps_its_model():
    from rwkv_chat.app.config import AppConfig
    from rwkv_chat.app.chat_service import Conversation
    from rwkv_chat.app.ui import ChatPage
    pool = make_pool(10**13, [], fail={"RWKV-4 World 3B"})
    page = ChatPage(ChatService(pool), ModelChoices(DEFAULT_MODEL), AppConfig(model=DEFAULT_MODEL, device="cpu"))
    kept = Conversation(key("RWKV-5 World 0.1B"))
    status = page.ui_load("RWKV-4 World 3B", "cpu", "fp32", kept, SessionControl())[3]
    assert "Could not load **RWKV-4 World 3B**: cannot get RWKV-4 World 3B" in status
    assert "Still chatting with" in status


def test_loading_a_model_presets_its_familys_chat_settings():
    from rwkv_chat.app.chat_service import Conversation
    from rwkv_chat.app.config import AppConfig
    from rwkv_chat.app.ui import FAMILY_FIELDS, ChatPage
    page = ChatPage(ChatService(make_pool(10**13, [])), ModelChoices(DEFAULT_MODEL),
                    AppConfig(model=DEFAULT_MODEL, device="cpu"))
    outputs = page.ui_load("RWKV-7 G1 0.1B", "cpu", "fp32", Conversation(key(DEFAULT_MODEL)), SessionControl())
    g1 = dict(zip(FAMILY_FIELDS, outputs[5:]))
    assert g1 == {"temperature": 1.0, "top_p": 0.3, "top_k": 0, "presence_penalty": 0.5, "frequency_penalty": 0.5,
                  "penalty_decay": 0.996, "prompt_style": "User/Assistant", "think": "fake think"}
    conversation = outputs[2]
    thinking = dict(zip(FAMILY_FIELDS, page.ui_think("think", conversation)))
    assert (thinking["top_p"], thinking["top_k"], thinking["presence_penalty"], thinking["penalty_decay"],
            thinking["think"]) == (0.5, 100, 0.0, 0.997, "think")
    outputs = page.ui_load("RWKV-6 World 1.6B", "cpu", "fp32", conversation, SessionControl())
    world = dict(zip(FAMILY_FIELDS, outputs[5:]))
    assert (world["prompt_style"], world["think"], world["top_p"]) == ("Question/Answer", "off", 0.3)
    assert page.default_settings.prompt_style == "Question/Answer"  # the CPU default is a World model


@pytest.mark.parametrize("source,g1", [("/models/rwkv7-g1a-0.4b-20250905-ctx4096.pth", True),
                                       ("BlinkDL/rwkv7-g1", True), ("RWKV-7 G1 2.9B", True),
                                       ("/models/RWKV-x070-World-0.1B-v2.8-20241210-ctx4096.pth", False),
                                       ("RWKV-7 World 0.1B", False), ("/models/big1.pth", False)])
def test_g1_models_are_told_apart_by_catalog_entry_or_file_name(source, g1):
    from rwkv_chat.app.chat_defaults import is_g1
    from rwkv_chat.app.model_choices import operator_choice
    assert is_g1(operator_choice(source)) is g1


def test_state_files_come_from_flags_or_the_environment():
    assert parse_config(["--state", "a=/x/a.pth", "--state", "b=/x/b.pth"], {}).states == ("a=/x/a.pth", "b=/x/b.pth")
    assert parse_config([], {"RWKV_STATES": "a=/x/a.pth; b=/x/b.pth;"}).states == ("a=/x/a.pth", "b=/x/b.pth")
    assert parse_config(["--state", "c=/c.pth"], {"RWKV_STATES": "a=/a.pth"}).states == ("c=/c.pth",)
    assert parse_config([], {}).states == ()


def test_launch_serves_v1_on_the_same_server_and_warns_when_v1_is_open_beyond_loopback(capsys):
    from rwkv_chat.app.config import AppConfig
    from rwkv_chat.app.openai_api import OpenAIApi
    from rwkv_chat.app.ui import launch

    class Demo:  # what launch() reads of a gr.Blocks that build_app made
        rwkv_openai = OpenAIApi(None, ModelChoices(DEFAULT_MODEL))
        max_threads = 40

        def launch(self, **kwargs):
            self.kwargs = kwargs

    demo = Demo()
    launch(demo, AppConfig(server_name="0.0.0.0"))
    paths = {route.path for route in demo.kwargs["app_kwargs"]["routes"]}
    assert paths == {"/v1/models", "/v1/chat/completions", "/v1/completions"}
    assert "open to anyone who can reach 0.0.0.0:7860" in capsys.readouterr().out
    launch(demo, AppConfig(server_name="0.0.0.0", api_key="k"))
    launch(demo, AppConfig(server_name="127.0.0.1"))
    assert capsys.readouterr().out == ""


def test_cors_origins_come_from_flags_or_the_environment_and_exclude_share():
    assert parse_config(["--cors-origins", "https://a.example, https://b.example"], {}).cors_origins == \
        ("https://a.example", "https://b.example")
    assert parse_config([], {"RWKV_CORS_ORIGINS": "*"}).cors_origins == ("*",)
    assert parse_config([], {}).cors_origins == ()
    with pytest.raises(ValueError, match="--cors-origins and --share cannot be combined"):
        parse_config(["--cors-origins", "*", "--share"], {})


# ---------------------------------------------------------------------------------------- stream pacing

def test_streams_share_one_update_budget(monkeypatch):
    """One stream passes an update every STREAM_INTERVAL_S (its first, its last and empty answers always); with
    many streams running, each passes fewer, so that together they stay within the pace's updates a second."""
    from types import SimpleNamespace

    from rwkv_chat.app import ui_stream
    clock = [0.0]
    monkeypatch.setattr(ui_stream.time, "monotonic", lambda: clock[0])

    def updates(count, step_s):  # a reply of `count` updates, one every step_s seconds of the fake clock
        for i in range(count):
            clock[0] += step_s
            yield SimpleNamespace(done=i == count - 1, answer="" if i == 0 else "x" * i)

    pace = ui_stream.StreamPace(updates_per_s=100)
    passed = list(pace.throttled(updates(101, 0.01)))  # 1 s of updates every 10 ms
    assert passed[0].answer == "" and passed[-1].done
    times = [0.01 * (len(u.answer) + 1) for u in passed]
    assert all(b - a >= ui_stream.STREAM_INTERVAL_S - 1e-9 for a, b in zip(times[1:-1], times[2:-1]))
    assert 19 <= len(passed) <= 23  # ~20 a second, plus the first and the last
    others = [pace.throttled(updates(10**6, 0.0)) for _ in range(49)]
    for stream in others:
        next(stream)  # 49 more streams running: 50 share 100 updates a second
    assert pace.streams == 49 and pace.interval() == pytest.approx(0.49)  # 0.5 once the 50th starts
    clock[0] = 0.0
    passed = list(pace.throttled(updates(101, 0.01)))
    assert 3 <= len(passed) <= 5  # the first, one every 0.5 s, the last
    for stream in others:
        stream.close()
    assert pace.streams == 0


def test_gradio_runs_every_chat_the_server_can_generate_at_once(make_checkpoint):
    """Gradio runs at most max_threads events at once whatever their concurrency limits (its queue's job slots,
    its thread limiter; 40 unless told): the app asks for a slot for every chat that can generate, plus Gradio's
    own 40 for the quick events."""
    from rwkv_chat.app.ui import GRADIO_DEFAULT_THREADS, build_app, worker_threads
    path = make_checkpoint("5.2", n_layer=2, n_embd=128, seed=6).path
    config = AppConfig(model=str(path), device="cpu", concurrency=128, engine_processes=1)
    demo = build_app(config)
    try:
        assert worker_threads(config) == 128 + GRADIO_DEFAULT_THREADS
        assert demo.max_threads == demo._queue.max_thread_count == worker_threads(config)
    finally:  # the default model's preload ends before the test does
        choices = ModelChoices(str(path))
        demo.rwkv_pool.get(choices.resolve(choices.default.value, "cpu", "auto"), by_visitor=False)
        demo.rwkv_pool.close()
