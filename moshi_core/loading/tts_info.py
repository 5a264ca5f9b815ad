"""What a server checks a TTS request against (voices, CFG strengths), from the model's
config.json alone: no weights are loaded, no model code is imported."""

import os
from dataclasses import dataclass
from typing import Any

from moshi_core.errors import InvalidParameterError
from moshi_core.loading.catalog import DEFAULT_TTS_SOURCE, DEFAULT_VOICE_REPO
from moshi_core.loading.files import read_config
from moshi_core.loading.hub import parse_source
from moshi_core.loading.voices import VoiceRepo


@dataclass(frozen=True)
class TTSInfo:
    """What a server checks requests against, from the model's config.json alone."""

    voices: VoiceRepo
    cfg_values: list[float]  # the distilled CFG strengths ([]: the model has none)

    def check_cfg(self, coef: float) -> None:
        if (self.cfg_values or [1.0]).count(coef) == 0:
            shown = ", ".join(f"{v:.1f}" for v in self.cfg_values or [1.0])
            raise InvalidParameterError(f"cfg_coef {coef} is not supported by this model (one of {shown})")


def describe_tts(source: str | os.PathLike = DEFAULT_TTS_SOURCE, voices: str | os.PathLike = DEFAULT_VOICE_REPO,
                 revision: str | None = None) -> TTSInfo:
    """The voices and CFG values of a TTS model, without loading its weights."""
    config = read_config(parse_source(source, revision), revision)
    lut = ((config.get("conditioners") or {}).get("cfg") or {}).get("lut") or {}
    values = sorted(float(v) for v in lut.get("possible_values") or [])
    return TTSInfo(voice_repo(config, voices), values)


def voice_repo(config: dict[str, Any], voices: str | os.PathLike) -> VoiceRepo:
    # Voice files carry the model's signature: `<voice>.<sig>@<epoch>.safetensors`.
    model_id = config.get("model_id") or {}
    suffix = f".{model_id['sig']}@{model_id['epoch']}.safetensors" if model_id else ".safetensors"
    return VoiceRepo(os.fspath(voices), suffix)
