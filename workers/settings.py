"""Serving settings, read once from the environment by the app, the API and the workers.

Both sides must agree on the storage directory, the queue and the models; reading one
`Settings` from the same variables is how they do. `VARIABLES` describes each variable
once: `Settings.from_env` parses and checks by it, and `render_table` writes the table of
docs/configuration.md from it. A bad value stops the process at start, not a job later.
"""

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moshi_core.loading.catalog import DEFAULT_LM_SOURCE, DEFAULT_STT_SOURCE, DEFAULT_TTS_SOURCE, DEFAULT_VOICE_REPO
from moshi_core.loading.hub import DEFAULT_MIMI_SOURCE, MIMI_FILENAMES
from moshi_core.params import DTYPE_NAMES, NO_CUDA_GRAPH, NO_TORCH_COMPILE, QUANTIZE_MODES, GpuStep, gpu_step_for

from .errors import SettingsError, UnknownModelError


def _default_storage() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "moshi-core" / "jobs"


@dataclass(frozen=True)
class Settings:
    redis_url: str | None = None  # None: the in-process queue
    storage_dir: Path = field(default_factory=_default_storage)
    models: tuple[str, ...] = (DEFAULT_LM_SOURCE,)  # the Moshi models jobs may name; the first is the default
    mimi: str = DEFAULT_MIMI_SOURCE
    stt_model: str = DEFAULT_STT_SOURCE  # speech-to-text (transcription jobs, /v1/audio/transcriptions)
    tts_model: str = DEFAULT_TTS_SOURCE  # text-to-speech (TTS jobs, /v1/audio/speech)
    tts_voices: str = DEFAULT_VOICE_REPO  # where the TTS voice embeddings come from
    device: str = "auto"
    dtype: str = "bfloat16"
    quantize: str = "none"  # "q8": float LM checkpoints become 8-bit Q8_0 as they load
    api_keys: frozenset[str] = frozenset()  # empty: no authentication
    metrics_key: str | None = None  # None: /metrics takes the API keys
    max_upload_bytes: int = 100 * 2**20
    max_audio_seconds: float = 600.0
    job_ttl_seconds: float = 24 * 3600.0
    key_max_jobs: int = 16  # unfinished (queued or running) jobs per API key
    key_max_storage_bytes: int = 4096 * 2**20  # files of one API key's unexpired jobs
    # The synchronous (OpenAI-style) endpoints take inputs up to this long, and wait this long.
    sync_max_seconds: float = 120.0
    sync_timeout_seconds: float = 600.0
    body_timeout_seconds: float = 300.0  # a request body must arrive whole within this
    body_idle_seconds: float = 30.0  # ... and with never this long without data
    max_attempts: int = 3  # deliveries of a job before it is given up (a job that kills its worker)
    # Dialogue jobs one worker process steps together on one model (one batched LM step per
    # frame); the in-process queue runs this many heavy jobs at once, as a threads-pool Celery
    # worker with this concurrency does.
    dialogue_slots: int = 4
    key_max_running: int = 0  # heavy jobs of one key the in-process queue prefers to run at once; 0: half the slots
    # Redis hands an unacknowledged job to another worker after this long: it must exceed the
    # longest job, or a slow job would run twice.
    visibility_timeout: float = 6 * 3600.0
    live_slots: int = 0  # live conversations at once; 0: 4 on a GPU, 1 on the CPU
    live_max_seconds: float = 300.0
    live_idle_seconds: float = 30.0  # a live conversation with no audio this long ends
    key_max_conversations: int = 1  # live conversations one API key may hold open at once
    cpu_kernels: bool = True
    q8_activations: str = "int8"  # how Q8_0 weights multiply on the CPU (moshi_core.kernels.q8)
    gpu_q8: str = "int8"  # ... and on CUDA: the Triton kernel, or dequantized at load (`set_gpu_q8`)
    preload: tuple[str, ...] = ()  # models the app loads at start, in the background (PRELOAD_NAMES)
    gpu_step: GpuStep = "cuda-graphs"  # on CUDA only: a CPU steps eagerly
    host: str = "127.0.0.1"
    port: int | None = None  # None: each front door's own (7860 for the app, 8000 for `python -m api`)

    @property
    def default_model(self) -> str:
        return self.models[0]

    def check_model(self, model: str | None) -> str:
        """The Moshi model a job will use: the one it names, if this server serves it."""
        if not model:
            return self.default_model
        if model not in self.models:
            raise UnknownModelError(f"unknown model {model!r}: this server serves {', '.join(self.models)} "
                                    "(an operator adds more with MOSHI_MODELS)")
        return model

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "Settings":
        """The settings of docs/configuration.md; SettingsError (one line) on a bad value."""
        given = {var.name: var.read(environ) for var in VARIABLES}  # None where unset
        values = {var.field: given[var.name] for var in VARIABLES
                  if var.field not in _COMBINED and given[var.name] is not None}
        model = given["MOSHI_MODEL"] or DEFAULT_LM_SOURCE
        values["mimi"] = mimi_for(model, given["MOSHI_MIMI"])
        values["models"] = tuple(dict.fromkeys([model, *(given["MOSHI_MODELS"] or ())]))
        values["gpu_step"] = gpu_step_for(bool(given[NO_TORCH_COMPILE]), bool(given[NO_CUDA_GRAPH]))
        if given["MOSHI_PRELOAD"] is None and environ.get("SPACE_ID"):  # set on every Hugging Face Space
            values["preload"] = SPACE_PRELOAD
        if host := given["HOST"] or given["GRADIO_SERVER_NAME"]:
            values["host"] = host
        return cls(**values)


@dataclass(frozen=True)
class Variable:
    name: str
    field: str  # of Settings
    default: str  # as the variable would be written; "" for none
    meaning: str
    allowed: str  # in words, for the docs and the error message
    parse: Callable[[str], Any]  # the field's value from the variable's text; ValueError when bad

    def read(self, environ: Mapping[str, str]) -> Any:
        """The parsed value, or None when the variable is unset or blank."""
        text = environ.get(self.name, "").strip()
        if not text:
            return None
        try:
            return self.parse(text)
        except ValueError:
            raise SettingsError(f"{self.name}={text!r} is not valid: use {self.allowed}") from None


def _text(text: str) -> str:
    return text


def _url(text: str) -> str:
    if "://" not in text:
        raise ValueError(text)
    return text


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _choice(*values: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in values:
            raise ValueError(text)
        return text
    return parse


def _device(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise ValueError(text)
    return text


def _positive(scale: float = 1.0, cast: Callable[[float], Any] = float) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = float(text)
        if not 0 < value < float("inf"):
            raise ValueError(text)
        return cast(value * scale)
    return parse


def _integer(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < low or (high is not None and value > high):
            raise ValueError(text)
        return value
    return parse


def read_variable(name: str, environ: Mapping[str, str] = os.environ) -> Any:
    """One variable's parsed value, None when unset: for a flag whose default is a rule when it is."""
    return next(var for var in VARIABLES if var.name == name).read(environ)


def mimi_for(model: str, named: str | None = None) -> str:
    """The Mimi a server uses: the one `named` (--mimi, MOSHI_MIMI), else the Mimi file of a
    local Moshi folder when it holds one (the codec that model was made with), else Kyutai's."""
    folder = Path(model).expanduser()
    own = [folder / name for name in MIMI_FILENAMES if folder.is_dir() and (folder / name).is_file()]
    return named or (str(own[0]) if own else DEFAULT_MIMI_SOURCE)


# What MOSHI_PRELOAD may name, in the order `all` loads them: the live tab's model first.
PRELOAD_NAMES = ("moshi", "mimi", "stt", "tts")
SPACE_PRELOAD = ("moshi", "mimi")  # what the live tab and the codec tabs need, on a Space's GPU


def parse_preload(text: str) -> tuple[str, ...]:
    """`none`, `all` or a comma-separated list of PRELOAD_NAMES -> the names, in their order."""
    names = _names(text.lower())
    if names == ("none",):
        return ()
    if names == ("all",):
        return PRELOAD_NAMES
    if not names or not set(names) <= set(PRELOAD_NAMES):
        raise ValueError(text)
    return tuple(n for n in PRELOAD_NAMES if n in names)


def _switch(text: str) -> bool:
    if text not in ("0", "1"):
        raise ValueError(text)
    return text == "1"


SOURCE = "a Hub repo id (optionally @revision), an hf:// URI or a local folder"
POSITIVE = "a number > 0"
SWITCH = "1 (on) or 0 (off)"
VARIABLES = (
    Variable("REDIS_URL", "redis_url", "", "Celery broker and result backend; unset: jobs run in the "
             "serving process", "a URL such as redis://host:6379/0", _url),
    Variable("MOSHI_STORAGE_DIR", "storage_dir", "~/.cache/moshi-core/jobs", "job inputs, results and records, "
             "shared by the API and the workers (under $XDG_CACHE_HOME when set)", "a folder",
             lambda text: Path(text).expanduser()),
    Variable("MOSHI_MODEL", "models", DEFAULT_LM_SOURCE, "Moshi model for dialogue jobs and live conversation",
             SOURCE, _text),
    Variable("MOSHI_MODELS", "models", "", "more Moshi models jobs may name (MOSHI_MODEL stays the default)",
             "comma-separated sources", _names),
    Variable("MOSHI_MIMI", "mimi", DEFAULT_MIMI_SOURCE, "Mimi codec for encode and decode jobs; unset: the "
             "Mimi file of a local MOSHI_MODEL folder when it holds one", SOURCE, _text),
    Variable("MOSHI_STT_MODEL", "stt_model", DEFAULT_STT_SOURCE, "speech-to-text model", SOURCE, _text),
    Variable("MOSHI_TTS_MODEL", "tts_model", DEFAULT_TTS_SOURCE, "text-to-speech model", SOURCE, _text),
    Variable("MOSHI_TTS_VOICES", "tts_voices", DEFAULT_VOICE_REPO, "where the TTS voices come from",
             "a Hub repo id or a local folder", _text),
    Variable("MOSHI_DEVICE", "device", "auto", "where models run; auto: CUDA when available",
             "auto, cpu, cuda or cuda:N", _device),
    Variable("MOSHI_DTYPE", "dtype", "bfloat16", "weights and compute of the language models",
             ", ".join(DTYPE_NAMES), _choice(*DTYPE_NAMES)),
    Variable("MOSHI_QUANTIZE", "quantize", "none", "q8: the float checkpoints of the language models (Moshi, "
             "STT, TTS) become 8-bit Q8_0 as they load, as in Kyutai's q8 GGUF (about half the memory); "
             "8-bit checkpoints and Mimi are left as they are", " or ".join(QUANTIZE_MODES),
             _choice(*QUANTIZE_MODES)),
    Variable("MOSHI_API_KEYS", "api_keys", "", "the keys every door but /healthz, /readyz, /readyz/live and "
             "/login needs (see docs/security.md); unset: no authentication",
             "comma-separated keys", lambda text: frozenset(_names(text))),
    Variable("MOSHI_METRICS_KEY", "metrics_key", "", "the one key `/metrics` takes (a Prometheus bearer token); "
             "unset: the API keys", "a key", _text),
    Variable("MOSHI_MAX_UPLOAD_MB", "max_upload_bytes", "100", "largest upload, in MB", POSITIVE,
             _positive(2**20, int)),
    Variable("MOSHI_MAX_AUDIO_SECONDS", "max_audio_seconds", "600", "longest audio accepted", POSITIVE,
             _positive()),
    Variable("MOSHI_JOB_TTL_HOURS", "job_ttl_seconds", "24", "jobs and their files are deleted this long after "
             "they finish", POSITIVE, _positive(3600)),
    Variable("MOSHI_KEY_MAX_JOBS", "key_max_jobs", "16", "unfinished (queued or running) jobs per API key "
             "(without keys: for all callers together); more is a 429", "an integer >= 1", _integer(1)),
    Variable("MOSHI_KEY_MAX_STORAGE_MB", "key_max_storage_bytes", "4096", "job files (inputs and results of "
             "unexpired jobs) per API key, in MB; more is a 429", POSITIVE, _positive(2**20, int)),
    Variable("MOSHI_SYNC_MAX_SECONDS", "sync_max_seconds", "120", "longest audio the synchronous OpenAI-style "
             "endpoints take", POSITIVE, _positive()),
    Variable("MOSHI_SYNC_TIMEOUT_SECONDS", "sync_timeout_seconds", "600", "how long the synchronous endpoints "
             "wait for their job", POSITIVE, _positive()),
    Variable("MOSHI_BODY_TIMEOUT_SECONDS", "body_timeout_seconds", "300", "a request body must arrive whole "
             "within this (408 otherwise)", POSITIVE, _positive()),
    Variable("MOSHI_BODY_IDLE_SECONDS", "body_idle_seconds", "30", "longest pause in a request body (408 "
             "otherwise)", POSITIVE, _positive()),
    Variable("MOSHI_MAX_ATTEMPTS", "max_attempts", "3", "starts of a job before it is given up (a job that "
             "kills its worker)", "an integer >= 1", _integer(1)),
    Variable("MOSHI_DIALOGUE_SLOTS", "dialogue_slots", "4", "dialogue jobs a process steps together on one "
             "model; the in-process queue runs this many Moshi jobs at once", "an integer >= 1", _integer(1)),
    Variable("MOSHI_KEY_MAX_RUNNING", "key_max_running", "0", "heavy jobs of one API key the in-process queue "
             "runs at once while another key's wait (alone, a key may use every slot); 0: half of "
             "MOSHI_DIALOGUE_SLOTS, rounded up", "an integer >= 0", _integer(0)),
    Variable("MOSHI_VISIBILITY_TIMEOUT_HOURS", "visibility_timeout", "6", "Redis hands an unacknowledged job "
             "to another worker after this; longer than any job", POSITIVE, _positive(3600)),
    Variable("MOSHI_LIVE_SLOTS", "live_slots", "0", "live conversations at once; 0: 4 on a GPU, 1 on the CPU",
             "an integer >= 0", _integer(0)),
    Variable("MOSHI_LIVE_MAX_SECONDS", "live_max_seconds", "300", "length limit of one live conversation",
             POSITIVE, _positive()),
    Variable("MOSHI_LIVE_IDLE_SECONDS", "live_idle_seconds", "30", "a live conversation that sends no audio "
             "this long ends (its slot is freed)", POSITIVE, _positive()),
    Variable("MOSHI_KEY_MAX_CONVERSATIONS", "key_max_conversations", "1", "live conversations one API key "
             "may hold open at once (with MOSHI_API_KEYS)", "an integer >= 1", _integer(1)),
    Variable("MOSHI_CPU_KERNELS", "cpu_kernels", "1", "our C++ CPU kernels; 0: PyTorch's own ops (for "
             "comparisons)", SWITCH, _switch),
    Variable("MOSHI_Q8_ACTIVATIONS", "q8_activations", "int8", "how 8-bit (Q8_0) weights multiply on the CPU: "
             "int8, activations quantized per block of 32 as GGUF runtimes do (faster); float, the "
             "dequantized model's numbers exactly", "int8 or float", _choice("int8", "float")),
    Variable("MOSHI_PRELOAD", "preload", "none", "models `python app.py` loads at start, in the background "
             "(the page comes up at once; /readyz shows the progress); unset: each on first use, except "
             "on a Hugging Face Space (SPACE_ID set): moshi,mimi",
             "none, all, or a comma-separated list of " + ", ".join(PRELOAD_NAMES), parse_preload),
    Variable("MOSHI_GPU_Q8", "gpu_q8", "int8", "how 8-bit (Q8_0) weights run on CUDA: int8, read by a "
             "Triton kernel (a quarter of bfloat16's memory); dequantize, turned into the model's dtype at "
             "load while the GPU has room", "int8 or dequantize", _choice("int8", "dequantize")),
    Variable(NO_TORCH_COMPILE, "gpu_step", "0", "Kyutai's switch: 1 steps the models eagerly on CUDA (no "
             "`torch.compile`, no CUDA graphs); by default the engines' LM step is compiled into CUDA graphs, "
             "captured as each engine is built (no effect on the CPU)", SWITCH, _switch),
    Variable(NO_CUDA_GRAPH, "gpu_step", "0", "Kyutai's switch: 1 compiles the LM step on CUDA without CUDA "
             "graphs", SWITCH, _switch),
    Variable("HOST", "host", "127.0.0.1", "interface the app and `python -m api` listen on; 0.0.0.0 for all",
             "a host name or address", _text),
    Variable("GRADIO_SERVER_NAME", "host", "", "the same, as a Hugging Face Space sets it; HOST wins",
             "a host name or address", _text),
    Variable("PORT", "port", "", "port to listen on; unset: 7860 for the app, 8000 for `python -m api`",
             "an integer from 1 to 65535", _integer(1, 65535)),
)
_COMBINED = ("models", "mimi", "gpu_step", "host")  # fields that several variables make together (see from_env)


def render_table() -> str:
    """The Markdown table of docs/configuration.md."""
    rows = ["| variable | setting | default | meaning | allowed values |", "|---|---|---|---|---|"]
    for var in VARIABLES:
        default = f"`{var.default}`" if var.default else "unset"
        rows.append(f"| `{var.name}` | `{var.field}` | {default} | {var.meaning} | {var.allowed} |")
    return "\n".join(rows) + "\n"
