"""Serving settings, read from the environment by the API and the workers alike.

Both sides must agree on the storage directory, the queue and the models; reading one
`Settings` from the same variables is how they do.
"""

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from moshi_core.errors import InvalidParameterError
from moshi_core.loading.catalog import DEFAULT_LM_SOURCE
from moshi_core.loading.hub import DEFAULT_MIMI_SOURCE


def _default_storage() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "moshi-core" / "jobs"


@dataclass(frozen=True)
class Settings:
    redis_url: str | None = None  # None: the in-process queue
    storage_dir: Path = Path("moshi-jobs")
    models: tuple[str, ...] = (DEFAULT_LM_SOURCE,)  # the Moshi models jobs may name; the first is the default
    mimi: str = DEFAULT_MIMI_SOURCE
    stt_model: str = "kyutai/stt-1b-en_fr"  # speech-to-text (transcription jobs, /v1/audio/transcriptions)
    tts_model: str = "kyutai/tts-1.6b-en_fr"  # text-to-speech (TTS jobs, /v1/audio/speech)
    tts_voices: str = "kyutai/tts-voices"  # where the TTS voice embeddings come from
    device: str = "auto"
    dtype: str = "bfloat16"
    api_keys: frozenset[str] = frozenset()  # empty: no authentication
    max_upload_bytes: int = 100 * 2**20
    max_audio_seconds: float = 600.0
    job_ttl_seconds: float = 24 * 3600.0
    # The synchronous (OpenAI-style) endpoints take inputs up to this long, and wait this long.
    sync_max_seconds: float = 120.0
    sync_timeout_seconds: float = 600.0
    max_attempts: int = 3  # deliveries of a job before it is given up (a job that kills its worker)
    # Dialogue jobs one worker process steps together on one model (one batched LM step per
    # frame); the in-process queue runs this many heavy jobs at once, as a threads-pool Celery
    # worker with this concurrency does.
    dialogue_slots: int = 4
    # Redis hands an unacknowledged job to another worker after this long: it must exceed the
    # longest job, or a slow job would run twice.
    visibility_timeout: float = 6 * 3600.0

    @property
    def default_model(self) -> str:
        return self.models[0]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "Settings":
        """The settings the README's configuration table documents."""

        def number(name: str, default: float) -> float:
            text = environ.get(name, "").strip()
            if not text:
                return default
            try:
                value = float(text)
            except ValueError:
                raise InvalidParameterError(f"{name} must be a number, got {text!r}") from None
            if not value > 0:
                raise InvalidParameterError(f"{name} must be positive, got {text!r}")
            return value

        model = environ.get("MOSHI_MODEL", "").strip() or DEFAULT_LM_SOURCE
        extra = [m.strip() for m in environ.get("MOSHI_MODELS", "").split(",") if m.strip()]
        models = tuple(dict.fromkeys([model, *extra]))
        keys = frozenset(k.strip() for k in environ.get("MOSHI_API_KEYS", "").split(",") if k.strip())
        return cls(
            redis_url=environ.get("REDIS_URL", "").strip() or None,
            storage_dir=Path(environ.get("MOSHI_STORAGE_DIR", "").strip() or _default_storage()),
            models=models,
            mimi=environ.get("MOSHI_MIMI", "").strip() or DEFAULT_MIMI_SOURCE,
            stt_model=environ.get("MOSHI_STT_MODEL", "").strip() or cls.stt_model,
            tts_model=environ.get("MOSHI_TTS_MODEL", "").strip() or cls.tts_model,
            tts_voices=environ.get("MOSHI_TTS_VOICES", "").strip() or cls.tts_voices,
            device=environ.get("MOSHI_DEVICE", "").strip() or "auto",
            dtype=environ.get("MOSHI_DTYPE", "").strip() or "bfloat16",
            api_keys=keys,
            max_upload_bytes=int(number("MOSHI_MAX_UPLOAD_MB", 100) * 2**20),
            max_audio_seconds=number("MOSHI_MAX_AUDIO_SECONDS", 600),
            job_ttl_seconds=number("MOSHI_JOB_TTL_HOURS", 24) * 3600,
            sync_max_seconds=number("MOSHI_SYNC_MAX_SECONDS", 120),
            sync_timeout_seconds=number("MOSHI_SYNC_TIMEOUT_SECONDS", 600),
            max_attempts=int(number("MOSHI_MAX_ATTEMPTS", 3)),
            dialogue_slots=int(number("MOSHI_DIALOGUE_SLOTS", 4)),
            visibility_timeout=number("MOSHI_VISIBILITY_TIMEOUT_HOURS", 6) * 3600,
        )
