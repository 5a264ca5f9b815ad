"""The Mimi codec jobs: audio file -> token file ("download Mimi tokens") and back.

One function per direction, shared by the CLI, the web app and the API workers.
"""

import torch

from moshi_core.errors import InvalidParameterError
from moshi_core.formats.audio import AudioSource, load_audio, pad_batch
from moshi_core.formats.tokens import MimiTokens, TokenSource, load_tokens
from moshi_core.models.mimi import MimiModel, Progress


def load_batch(sources: list[AudioSource], max_seconds: float | None = None) -> list[torch.Tensor]:
    """Read and check every input before any model work, so bad input fails fast."""
    if not sources:
        raise InvalidParameterError("no audio to encode")
    return [load_audio(s, max_seconds=max_seconds) for s in sources]


def encode_audio(
    mimi: MimiModel,
    audio: torch.Tensor | list[torch.Tensor],
    *,
    num_codebooks: int = 8,
    progress: Progress | None = None,
) -> MimiTokens:
    """Encode a 24 kHz mono waveform [1, T] (or a list of them, as one batch) into tokens.

    A list is padded to the longest item and encoded as one batch; each item's true length
    is kept in the token file so decoding trims it back.
    """
    batched = isinstance(audio, list)
    wavs = audio if batched else [audio]
    if not wavs:
        raise InvalidParameterError("no audio to encode")
    batch, lengths = pad_batch(wavs)
    with torch.inference_mode():
        codes = mimi.encode(batch.to(mimi.device), num_codebooks, progress=progress).cpu()
    return MimiTokens(
        codes=codes if batched else codes[0],
        num_samples=lengths,
        codec=mimi.checkpoint_id,
        batched=batched,
    )


def decode_tokens(
    mimi: MimiModel, tokens: MimiTokens | TokenSource, progress: Progress | None = None
) -> list[torch.Tensor]:
    """Decode a token file (or loaded tokens) into one 24 kHz waveform [1, T] per item."""
    if not isinstance(tokens, MimiTokens):
        tokens = load_tokens(tokens)
    with torch.inference_mode():
        wav = mimi.decode(tokens.codes.to(mimi.device), progress=progress).cpu()
    return [wav[i, :, :n] for i, n in enumerate(tokens.num_samples)]
