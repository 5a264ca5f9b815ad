"""TTS voices: speaker embeddings laid out like Kyutai's `kyutai/tts-voices` repo.

A voice is a safetensors file holding `speaker_wavs` [1, 512, T] (10 s of Mimi latents at
12.5 Hz), named `<voice>.<sig>@<epoch>.safetensors`, where `sig@epoch` is the `model_id` of
the TTS model it was made for (`.1e68beda@240.safetensors` for `kyutai/tts-1.6b-en_fr`).
A voice is asked for by its name in the voice repo (`expresso/ex03-ex01_happy_001_channel1_334s.wav`)
or by an `hf://OWNER/REPO/FILE` URI inside that repo; the machine's own user (the CLI,
`allow_paths`) may also name any hf:// URI or a local `.safetensors` path. A request from
elsewhere never makes the server read a file of its choosing or fetch a repo of its choosing.
The voice repo itself can be a Hub repo id or a local folder with the same layout.
"""

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from moshi_core.errors import CheckpointError, InvalidParameterError, ModelSourceError
from moshi_core.loading.files import read_safetensors
from moshi_core.loading.hub import ModelSource, hub_offline, parse_source, resolve_file


@dataclass(frozen=True)
class VoiceRepo:
    """Where voices live and which file suffix matches the model (`.sig@epoch.safetensors`)."""

    source: str
    suffix: str

    def path(self, voice: str, *, allow_paths: bool = False) -> Path:
        """The local file of a voice, downloaded into the HF cache if needed.

        `allow_paths`: also any hf:// URI and local `.safetensors` files, for the machine's own
        user (the CLI); without it only voices of this repo are found.
        """
        voice = voice.strip()
        if not voice:
            raise InvalidParameterError("empty voice name")
        if voice.startswith("hf://"):
            return self._hub_voice(voice, allow_paths)
        if allow_paths and voice.endswith(".safetensors") and Path(voice).expanduser().is_file():
            return Path(voice).expanduser()
        if not voice.isprintable() or voice.startswith(("/", "~")) or "\\" in voice or any(p in ("", ".", "..") for p in voice.split("/")):
            raise InvalidParameterError(f"voice {voice!r}: give the name of a voice of the voice repo (see the voice list)")
        parsed = parse_source(self.source)
        name = voice if voice.endswith(self.suffix) else voice + self.suffix
        if parsed.local is not None:
            path = parsed.local / name
            if not path.is_file():
                raise InvalidParameterError(f"unknown voice {voice!r}: the voice repo has no {name} (see the voice list)")
            return path
        return self._fetch(voice, parsed, name)

    def _hub_voice(self, voice: str, allow_paths: bool) -> Path:
        try:
            asked = parse_source(voice)
        except ModelSourceError as exc:
            raise InvalidParameterError(f"voice {exc}; give a name of the voice list, or an hf:// URI inside "
                                        "the voice repo") from exc
        if allow_paths:
            return resolve_file(voice, [])
        repo = parse_source(self.source)
        if repo.local is not None or asked.repo_id != repo.repo_id or not asked.filename:
            raise InvalidParameterError(f"voice {voice!r}: only voices of this server's voice repo are offered; "
                                        "give a name from the voice list")
        return self._fetch(voice, ModelSource(repo_id=repo.repo_id, revision=asked.revision or repo.revision),
                           asked.filename)

    @staticmethod
    def _fetch(voice: str, repo: ModelSource, name: str) -> Path:
        try:
            return resolve_file(f"hf://{repo.repo_id}/{name}", [], repo.revision)
        except ModelSourceError as exc:
            if "has none of" in str(exc):
                raise InvalidParameterError(f"unknown voice {voice!r}: {repo.repo_id} has no {name}") from exc
            raise

    def names(self) -> list[str]:
        """Every voice of the repo made for this model, by name (sorted)."""
        parsed = parse_source(self.source)
        if parsed.local is not None:
            files = [p.relative_to(parsed.local).as_posix() for p in parsed.local.rglob(f"*{self.suffix}")]
        else:
            files = _hub_files(parsed.repo_id, parsed.revision)
        return sorted(f.removesuffix(self.suffix) for f in files if f.endswith(self.suffix))


# (repo id, revision) -> its file list. A voice repo changes rarely and a listing is a round
# trip to the Hub (25 s of retries when it is unreachable): a process lists each repo once.
_LISTED: dict[tuple[str, str | None], list[str]] = {}
_LISTED_LOCK = threading.Lock()


def _hub_files(repo_id: str, revision: str | None) -> list[str]:
    """The repo's file list: from the Hub (once per process), or from the local cache when
    offline or the Hub does not answer."""
    from huggingface_hub import list_repo_files, snapshot_download

    with _LISTED_LOCK:
        if (repo_id, revision) in _LISTED:
            return _LISTED[repo_id, revision]
    try:
        if hub_offline():
            folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
            return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]  # not kept: it grows
        files = list_repo_files(repo_id, revision=revision)
    except Exception as exc:  # huggingface_hub raises many kinds; all mean "cannot list"
        raise ModelSourceError(f"cannot list the voices of {repo_id}: {exc}") from exc
    with _LISTED_LOCK:
        _LISTED[repo_id, revision] = files
    return files


def load_voice(path: str | os.PathLike) -> torch.Tensor:
    """The speaker embedding of a voice file as [T, D] (frames, channels), float32."""
    state = read_safetensors(path)
    if "speaker_wavs" not in state:
        raise CheckpointError(f"{path} is not a voice file: it has no 'speaker_wavs' tensor")
    emb = state["speaker_wavs"]
    if emb.dim() != 3 or emb.shape[0] != 1:
        raise CheckpointError(f"{path}: speaker_wavs must be [1, D, T], not {list(emb.shape)}")
    return emb[0].T.float()


def speakers_tensor(voices: list[torch.Tensor], max_speakers: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `max_speakers` embeddings [T_i, D] -> ([max_speakers * T, D], mask), each speaker
    in its own block of T rows (T the longest); unused rows are masked out."""
    if len(voices) > max_speakers:
        raise InvalidParameterError(f"at most {max_speakers} voices, not {len(voices)}")
    for v in voices:
        if v.shape[1] != dim:
            raise CheckpointError(f"the voice has {v.shape[1]} channels; the model takes {dim}")
    frames = max(v.shape[0] for v in voices)
    tensor = torch.zeros(max_speakers, frames, dim)
    mask = torch.zeros(max_speakers, frames, dtype=torch.bool)
    for i, v in enumerate(voices):
        tensor[i, : v.shape[0]] = v
        mask[i, : v.shape[0]] = True
    return tensor.flatten(0, 1), mask.flatten()
