"""Offline dialogue: the user's side of a conversation from a file, Moshi's answer out.

The same step as a live session (`LMGenerator`), driven by the file's frames: Mimi encodes
the user's audio, Moshi listens and speaks frame by frame, Mimi decodes Moshi's codes. The
first frame is fed twice, as Kyutai's `run_inference` does: the model's first step only
primes the delayed streams, so the second is the first that yields a frame, and every output
frame lines up with the input frame of the same time.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .audio import pad_batch
from .errors import InvalidParameterError
from .generate import LMGenerator
from .models import MoshiModels
from .sampling import SamplingParams
from .text import TextStream, Word

Progress = Callable[[int, int], None]


@dataclass
class DialogueResult:
    audio: torch.Tensor  # Moshi's voice [1, T], 24 kHz
    stereo: torch.Tensor  # [2, T]: user left, Moshi right
    words: list[Word]  # Moshi's inner monologue, timed
    text: str
    tokens: torch.Tensor  # [1 + dep_q, F]: text then audio codes, one column per frame

    def transcript(self) -> dict:
        return {"text": self.text, "words": [w.to_dict() for w in self.words]}


def run_dialogue(
    models: MoshiModels,
    user_audio: torch.Tensor | list[torch.Tensor],
    *,
    sampling: SamplingParams | None = None,
    seed: int | None = None,
    progress: Progress | None = None,
) -> DialogueResult | list[DialogueResult]:
    """Moshi's side of a conversation with each 24 kHz waveform [1, T] (a list is one batch)."""
    batched = isinstance(user_audio, list)
    wavs = user_audio if batched else [user_audio]
    if not wavs:
        raise InvalidParameterError("no audio for the dialogue")
    lm, mimi = models.lm, models.mimi
    batch, lengths = pad_batch(wavs)
    frames = -(-max(lengths) // mimi.frame_size)
    user_streams = lm.cfg.num_codebooks - lm.cfg.dep_q - 1
    generator = LMGenerator(lm, sampling or SamplingParams.from_config(models.generation_defaults), seed=seed)
    state = generator.init_state(len(wavs))
    with torch.inference_mode():
        user_codes = mimi.encode(batch.to(mimi.device), num_codebooks=user_streams).to(lm.device)
        generator.step(user_codes[..., :1], state)  # primes the delayed streams; yields nothing
        steps = []
        for t in range(frames):
            steps.append(generator.step(user_codes[..., t : t + 1], state))
            if progress is not None:
                progress(t + 1, frames)
        tokens = torch.stack(steps, dim=-1)  # [B, 1 + dep_q, F]
        moshi = mimi.decode(tokens[:, 1:].to(mimi.device)).cpu()
    results = []
    for i, n in enumerate(lengths):
        text = TextStream(models.tokenizer, frame_rate=mimi.frame_rate,
                          skip=(lm.cfg.existing_text_end_padding_id, lm.cfg.existing_text_padding_id))
        for t, token in enumerate(tokens[i, 0].tolist()):
            text.push(token, t)
        words = text.flush()
        audio = moshi[i, :, :n]
        results.append(DialogueResult(
            audio=audio, stereo=torch.cat([batch[i, :, :n], audio]), words=words, text=text.text,
            tokens=tokens[i].cpu(),
        ))
    return results if batched else results[0]
