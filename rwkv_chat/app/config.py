"""The chat app's settings from command-line flags and environment variables, as one frozen `AppConfig`.

Promises: a flag wins over its environment variable, which wins over the default, so the same code runs
locally (`python app.py --model ... --port ...`) and on a Hugging Face Space (settings as Space variables):

    flag             environment                         default
    --model          RWKV_MODEL                          RWKV-5 World 0.1B (a catalog name, hub id or local path)
    --models         RWKV_MODELS (comma-separated)       all; small on a Space: the models visitors may pick
                                                         (catalog names, `all`, `small` = downloads of at most 2 GB
                                                         taking at most half the device's memory, `none`) + always
                                                         --model
    --load-cooldown  RWKV_LOAD_COOLDOWN                  0 s; 300 s on a Space: after a visitor's request loads a
                                                         model, other new loads wait this long (loaded ones don't)
    --device         RWKV_DEVICE                         auto (CUDA when present, else CPU)
    --dtype          RWKV_DTYPE                          auto (bf16 on CUDA, fp32 on CPU); fp32, bf16, fp16, int8, int4
    --preamble       RWKV_PREAMBLE                       none (system text read before every conversation)
    --port           GRADIO_SERVER_PORT, PORT            7860
    --server-name    GRADIO_SERVER_NAME                  0.0.0.0 on a Space (SPACE_ID set), else 127.0.0.1
    --share          GRADIO_SHARE (1/true/yes)           off
    --concurrency    RWKV_CONCURRENCY                    auto: chats generating at once (one decode batch), as many
                                                         as the device holds states for beside --model (up to
                                                         256 on a GPU; 8 on a CPU); a number from 1 to 256 wins
    --max-queue      RWKV_MAX_QUEUE                      auto: twice the concurrency, at least 64 waiting requests
    --engine-processes RWKV_ENGINE_PROCESSES             auto: on a CPU, serve each model from this many processes
                                                         (1 to 64; each a copy of the model, an equal share of the
                                                         torch threads and 8 more chats of the auto concurrency);
                                                         auto: for the 0.1B models in int8/int4 one per 4 torch
                                                         threads, as many copies as half the available RAM holds;
                                                         1 for larger models (app/engine_factory.py)
    --data-dir       RWKV_DATA_DIR                       a Space's /data/rwkv-chat when mounted, else
                                                         ~/.cache/rwkv-chat (the conversation store lives there)
    --keep-days      RWKV_KEEP_DAYS                      30 (conversations unchanged longer are deleted; 0 = never)
    --drain-seconds  RWKV_DRAIN_SECONDS                  8 (on SIGTERM, how long running answers may go on)

Unknown arguments are ignored, so tools that import `app.py` with their own argv do not break it. A bad value
stops the start with a message naming the flag or variable (exit status 2, no traceback). "auto" stays
None in the parsed config until `AppConfig.sized(capacity)` settles it at start-up from what the operator's
model and the device hold (`model_pool.chat_capacity`), before the page and its queue are built.
Knows nothing of Gradio or models.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from ..loading.catalog import DEFAULT_MODEL, suggested_model
from .model_choices import ALL_MODELS, SMALL_MODELS

DEVICE_CHOICES = ("auto", "cuda", "cpu")
DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16", "int8", "int4")
DEFAULT_PORT = 7860
MAX_CONCURRENCY = 256  # chats generating at once: the largest decode batch (runtime/cuda_graphs.BUCKETS)
AUTO = "auto"
DEFAULT_MAX_QUEUE = 64  # the least --max-queue "auto" gives
QUEUE_PER_CHAT = 2  # --max-queue "auto": this many waiting requests per chat generating
TRUE_WORDS = ("1", "true", "yes", "on")
SPACE_LOAD_COOLDOWN_S = 300.0  # a Space: visitors start at most one new model load every 5 minutes
MAX_LOAD_COOLDOWN_S = 86_400.0
DEFAULT_KEEP_DAYS = 30.0
DEFAULT_DRAIN_SECONDS = 8.0  # Docker (and so a Space) sends SIGKILL 10 s after SIGTERM
MAX_ENGINE_PROCESSES = 64
DEFAULT_STATS_EVERY = 60.0  # seconds between the decode batcher's lines in the server's output, while it works
MAX_STATS_EVERY = 86_400.0
SPACE_STORAGE = Path("/data")  # a Hugging Face Space's persistent storage, when the Space has it


@dataclass(frozen=True)
class AppConfig:
    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"
    preamble: Optional[str] = None
    port: int = DEFAULT_PORT
    server_name: str = "127.0.0.1"
    share: bool = False
    concurrency: Optional[int] = None  # None: auto, settled by `sized` at start-up
    max_queue: Optional[int] = None  # None: auto (QUEUE_PER_CHAT per chat, at least DEFAULT_MAX_QUEUE)
    models: tuple[str, ...] = (ALL_MODELS,)  # what visitors may pick: catalog names, "all", "small" (model_choices)
    load_cooldown: float = 0.0  # seconds between loads visitors start (model_pool.LoadCooldown); 0: no limit
    states: tuple[str, ...] = ()  # state files offered to chats, as NAME=PATH (loading/state_files.py)
    api_key: Optional[str] = None  # bearer key the OpenAI-compatible /v1 routes require (None: open, like the page)
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the server ("*": any); () = Gradio's rules
    data_dir: Optional[str] = None  # where conversations are saved; None: in memory only (parse_config always sets one)
    keep_days: float = DEFAULT_KEEP_DAYS  # saved conversations unchanged for longer are deleted; 0: kept forever
    drain_seconds: float = DEFAULT_DRAIN_SECONDS
    stats_every: float = DEFAULT_STATS_EVERY  # 0: no decode statistics in the output
    engine_processes: Optional[int] = None  # CPU models are served by this many processes; None: auto
    # (engine_factory.engine_process_count settles it for each model, serving/engine_processes.py runs them)

    def __post_init__(self):
        if self.device not in DEVICE_CHOICES:
            raise ValueError(f"device must be one of {', '.join(DEVICE_CHOICES)}, got {self.device!r}")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        if self.concurrency is not None and not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise ValueError(_concurrency_bounds(self.concurrency))
        if self.max_queue is not None and self.max_queue < 1:
            raise ValueError(f"--max-queue must be at least 1 waiting request, or auto; got {self.max_queue}")
        if not 0 <= self.load_cooldown <= MAX_LOAD_COOLDOWN_S:  # NaN fails too
            raise ValueError(f"--load-cooldown must be between 0 and {MAX_LOAD_COOLDOWN_S:g} seconds, "
                             f"got {self.load_cooldown}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be between 1 and 65535, got {self.port}")
        if not 0 <= self.keep_days <= 36_500:
            raise ValueError(f"keep_days must be between 0 (forever) and 36500, got {self.keep_days}")
        if not 0 <= self.drain_seconds <= 600:
            raise ValueError(f"drain_seconds must be between 0 and 600, got {self.drain_seconds}")
        if not 0 <= self.stats_every <= MAX_STATS_EVERY:  # NaN fails too
            raise ValueError(f"--stats-every must be between 0 (off) and {MAX_STATS_EVERY:g} seconds, "
                             f"got {self.stats_every}")
        if self.engine_processes is not None and not 1 <= self.engine_processes <= MAX_ENGINE_PROCESSES:
            raise ValueError(_processes_bounds(self.engine_processes))
        if self.cors_origins and self.share:
            raise ValueError("--cors-origins and --share cannot be combined: a share link needs Gradio's own server, "
                             "whose CORS rules cannot be changed")

    def sized(self, capacity: int) -> "AppConfig":
        """This config with "auto" settled: concurrency = `capacity` (clamped to 1..MAX_CONCURRENCY) unless
        set, the queue QUEUE_PER_CHAT waiting requests per chat (at least DEFAULT_MAX_QUEUE) unless set."""
        concurrency = self.concurrency or max(1, min(MAX_CONCURRENCY, int(capacity)))
        max_queue = self.max_queue or max(DEFAULT_MAX_QUEUE, QUEUE_PER_CHAT * concurrency)
        return replace(self, concurrency=concurrency, max_queue=max_queue)


def _concurrency_bounds(value: int) -> str:
    return (f"--concurrency must be between 1 and {MAX_CONCURRENCY} chats generating at once (the largest decode "
            f"batch), or auto (what the device holds); got {value}")


def _processes_bounds(value: int) -> str:
    return (f"--engine-processes must be between 1 and {MAX_ENGINE_PROCESSES} processes serving a CPU model, "
            f"or auto (several for a small model on many threads, as memory allows); got {value}")


def _count_or_auto(name: str):
    """A parser of a count that may be "auto" (-> None); argparse reports its error with the flag's name."""
    def parse(value: str) -> Optional[int]:
        if str(value).strip().lower() == AUTO:
            return None
        try:
            return int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} takes a whole number or 'auto', not {value!r}") from None
    return parse


def _env_count(env: Mapping[str, str], name: str) -> Optional[int]:
    try:
        return _count_or_auto(name)(env.get(name) or AUTO)
    except argparse.ArgumentTypeError as error:
        raise ValueError(str(error)) from None


def _env_number(env: Mapping[str, str], names: Sequence[str], default, kind=float):
    """The first of the variables `names` that is set, as a `kind` (float or int), else `default`; ValueError naming
    the variable when its value is not such a number."""
    for name in names:
        value = env.get(name)
        if value:
            try:
                return kind(value)
            except ValueError:
                what = "a whole number" if kind is int else "a number"
                raise ValueError(f"{name} takes {what}, not {value!r}") from None
    return default


def _parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    on_space = bool(env.get("SPACE_ID"))
    parser = argparse.ArgumentParser(description="Chat with RWKV models (RWKV-4, 5, 6 and 7; World and G1).")
    parser.add_argument("--model", default=env.get("RWKV_MODEL"),
                        help="catalog name (e.g. 'RWKV-7 G1 1.5B'), hub repo id, or a local .pth file / "
                             "transformers-format directory (default: an RWKV-7 G1 model that fits the GPU, "
                             f"{DEFAULT_MODEL} without one)")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default=env.get("RWKV_DEVICE", "auto"))
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=env.get("RWKV_DTYPE", "auto"))
    parser.add_argument("--preamble", default=env.get("RWKV_PREAMBLE"),
                        help="system text read before every conversation (its state is computed once)")
    parser.add_argument("--port", type=int,
                        default=_env_number(env, ("GRADIO_SERVER_PORT", "PORT"), DEFAULT_PORT, int))
    parser.add_argument("--server-name", dest="server_name",
                        default=env.get("GRADIO_SERVER_NAME", "0.0.0.0" if on_space else "127.0.0.1"))
    parser.add_argument("--share", action="store_true",
                        default=env.get("GRADIO_SHARE", "").lower() in TRUE_WORDS,
                        help="also serve through a temporary public *.gradio.live link")
    parser.add_argument("--concurrency", type=_count_or_auto("--concurrency"),
                        default=_env_count(env, "RWKV_CONCURRENCY"),
                        help=f"how many chats may generate at the same time, 1 to {MAX_CONCURRENCY} (default: auto, "
                             "as many as the device has memory for beside the model, up to "
                             f"{MAX_CONCURRENCY} on a GPU, a few on a CPU)")
    parser.add_argument("--max-queue", dest="max_queue", type=_count_or_auto("--max-queue"),
                        default=_env_count(env, "RWKV_MAX_QUEUE"),
                        help=f"how many requests may wait for a free chat (default: auto, {QUEUE_PER_CHAT} per "
                             f"chat, at least {DEFAULT_MAX_QUEUE})")
    parser.add_argument("--models", default=env.get("RWKV_MODELS") or (SMALL_MODELS if on_space else ALL_MODELS),
                        help="comma-separated models visitors may pick: catalog names and/or 'all', 'small' "
                             "(downloads of at most 2 GB that fit in half the device's memory), 'none' (only "
                             "--model); --model always "
                             "(default: all; small on a Space)")
    parser.add_argument("--load-cooldown", dest="load_cooldown", type=float,
                        default=_env_number(env, ("RWKV_LOAD_COOLDOWN",), SPACE_LOAD_COOLDOWN_S if on_space else 0.0),
                        help="after a visitor's request loads a model, refuse other new loads for this many "
                             "seconds (models already loaded stay usable; default: 0, 300 on a Space)")
    parser.add_argument("--api-key", dest="api_key", default=env.get("RWKV_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on the OpenAI-compatible /v1 routes")
    parser.add_argument("--cors-origins", dest="cors_origins", default=env.get("RWKV_CORS_ORIGINS", ""),
                        help="comma-separated browser origins allowed to call the server, /v1 included "
                             "(e.g. https://app.example, or *); not with --share")
    parser.add_argument("--state", dest="states", action="append", metavar="NAME=PATH",
                        help="offer a state file (state tuning, a persona) to chats with the models it fits; "
                             "repeatable; also RWKV_STATES='NAME=PATH;NAME2=PATH2'")
    parser.add_argument("--data-dir", dest="data_dir", default=env.get("RWKV_DATA_DIR") or str(default_data_dir(env)),
                        help="directory of the conversation store (conversations survive reloads and restarts)")
    parser.add_argument("--keep-days", dest="keep_days", type=float,
                        default=_env_number(env, ("RWKV_KEEP_DAYS",), DEFAULT_KEEP_DAYS),
                        help="delete saved conversations unchanged for this many days (0: keep them forever)")
    parser.add_argument("--drain-seconds", dest="drain_seconds", type=float,
                        default=_env_number(env, ("RWKV_DRAIN_SECONDS",), DEFAULT_DRAIN_SECONDS),
                        help="on SIGTERM, how long answers being written may go on before they are stopped")
    parser.add_argument("--stats-every", dest="stats_every", type=float,
                        default=_env_number(env, ("RWKV_STATS_EVERY",), DEFAULT_STATS_EVERY),
                        help="print a line on the batched decoding (tokens/s, mean batch, where a step's time goes) "
                             "this often in seconds while chats generate (0: never)")
    parser.add_argument("--engine-processes", dest="engine_processes", type=_count_or_auto("--engine-processes"),
                        default=_env_count(env, "RWKV_ENGINE_PROCESSES"),
                        help=f"serve a model on the CPU from this many processes (1 to {MAX_ENGINE_PROCESSES}), each "
                             "with its own copy of the model and an equal share of the torch threads, so that a small "
                             "model's per-token work uses every core (default: auto, for a 0.1B model in int8 or "
                             "int4 one per 4 threads as long as the copies take at most half the available memory, "
                             "else one; GPUs keep one)")
    return parser


def default_data_dir(env: Mapping[str, str]) -> Path:
    """A Space's persistent storage when it is mounted and writable, else the user's cache directory."""
    if env.get("SPACE_ID") and SPACE_STORAGE.is_dir() and os.access(SPACE_STORAGE, os.W_OK):
        return SPACE_STORAGE / "rwkv-chat"
    return Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rwkv-chat"


def _models(value: str, on_space: bool) -> tuple[str, ...]:
    """--models as a tuple of entries; an empty value means the default."""
    entries = tuple(entry.strip() for entry in value.split(",") if entry.strip())
    return entries or ((SMALL_MODELS,) if on_space else (ALL_MODELS,))


def gpu_memory(device: str) -> Optional[int]:
    """Total memory of the GPU the app will use, or None when it runs on the CPU."""
    if device == "cpu" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory


def parse_config(argv: Optional[Sequence[str]] = None, env: Optional[Mapping[str, str]] = None) -> AppConfig:
    """Flags from `argv` (default: sys.argv[1:]) over variables from `env` (default: os.environ)."""
    env = os.environ if env is None else env
    try:
        parser = _parser(env)
    except ValueError as error:  # an environment variable that is not a number: its name and value, no traceback
        print(f"{Path(sys.argv[0]).name or 'rwkv-chat'}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    args, _unknown = parser.parse_known_args(argv)
    if args.concurrency is not None and not 1 <= args.concurrency <= MAX_CONCURRENCY:
        parser.error(_concurrency_bounds(args.concurrency))  # a usage line and the reason, not a traceback
    if args.engine_processes is not None and not 1 <= args.engine_processes <= MAX_ENGINE_PROCESSES:
        parser.error(_processes_bounds(args.engine_processes))
    preamble = args.preamble if args.preamble and args.preamble.strip() else None
    model = args.model or suggested_model(gpu_memory(args.device))
    states = tuple(args.states) if args.states else tuple(
        item.strip() for item in env.get("RWKV_STATES", "").split(";") if item.strip())
    return AppConfig(model=model, device=args.device, dtype=args.dtype, preamble=preamble, port=args.port,
                     server_name=args.server_name, share=args.share, concurrency=args.concurrency,
                     max_queue=args.max_queue, models=_models(args.models, on_space=bool(env.get("SPACE_ID"))),
                     load_cooldown=args.load_cooldown, states=states, api_key=args.api_key or None,
                     cors_origins=tuple(o.strip() for o in args.cors_origins.split(",") if o.strip()),
                     data_dir=args.data_dir, keep_days=args.keep_days, drain_seconds=args.drain_seconds,
                     stats_every=args.stats_every, engine_processes=args.engine_processes)
