"""Offline dialogue: the user's side of a conversation from a file, Moshi's answer out.

The same step as a live session (`LMGenerator`), driven by the file's frames: Mimi encodes
the user's audio (`encode_dialogues`), Moshi listens and speaks frame by frame in a
`DialogueBatch`, Mimi decodes Moshi's codes (`dialogue_result`). `run_dialogue` does it all
in the caller's thread; the workers' engine shares one batch among concurrent callers with
the same two ends.
"""

import secrets
from dataclasses import dataclass

import torch

from moshi_core.engines.dialogue import Dialogue, DialogueBatch, progress_of
from moshi_core.errors import InvalidParameterError
from moshi_core.formats.audio import pad_batch
from moshi_core.formats.text import TextStream, Word
from moshi_core.loading.registry import MoshiModels
from moshi_core.models.mimi import Progress
from moshi_core.params import SamplingParams


@dataclass
class DialogueResult:
    audio: torch.Tensor  # Moshi's voice [1, T], 24 kHz
    stereo: torch.Tensor  # [2, T]: user left, Moshi right
    words: list[Word]  # Moshi's inner monologue, timed
    text: str
    tokens: torch.Tensor  # [1 + dep_q, F]: text then audio codes, one column per frame
    seed: int  # the one it was sampled with: the same seed and input give the same answer
    peak_batch: int = 1  # the most dialogues stepped together while this one ran

    def transcript(self) -> dict:
        return {"text": self.text, "words": [w.to_dict() for w in self.words]}


def fresh_seed() -> int:
    """A seed for a dialogue asked without one, kept so its answer can be had again; below 2**31
    so every client holds it exactly (a JavaScript number, a form's integer field)."""
    return secrets.randbelow(2**31)


def encode_dialogues(
    models: MoshiModels, wavs: list[torch.Tensor], sampling: SamplingParams | None, seed: int | None
) -> tuple[list[Dialogue], list[torch.Tensor]]:
    """One `Dialogue` per 24 kHz waveform [1, T] (the model's sampling when None; a fresh seed
    each when `seed` is None), and each user's waveform as Mimi heard it, for the stereo of the result."""
    if not wavs:
        raise InvalidParameterError("no audio for the dialogue")
    sampling = sampling or SamplingParams.from_config(models.generation_defaults)
    lm, mimi = models.lm, models.mimi
    batch, lengths = pad_batch(wavs)
    user_streams = lm.cfg.num_codebooks - lm.cfg.dep_q - 1
    with torch.inference_mode():
        codes = mimi.encode(batch.to(mimi.device), num_codebooks=user_streams).to(lm.device)  # [B, n_user, F]
    frames = [-(-n // mimi.frame_size) for n in lengths]
    dialogues = [Dialogue(codes[i, :, :f], sampling, fresh_seed() if seed is None else seed)
                 for i, f in enumerate(frames)]
    return dialogues, [batch[i, :, :n] for i, n in enumerate(lengths)]


def dialogue_result(models: MoshiModels, dialogue: Dialogue, user: torch.Tensor) -> DialogueResult:
    """A finished dialogue's frames decoded to Moshi's voice and timed text."""
    cfg = models.lm.cfg
    tokens = torch.stack(dialogue.frames, dim=-1)  # [1 + dep_q, F]
    with torch.inference_mode():
        moshi = models.mimi.decode(tokens[None, 1:].to(models.mimi.device)).cpu()[0, :, : user.shape[-1]]
    text = TextStream(models.tokenizer, frame_rate=models.mimi.frame_rate,
                      skip=(cfg.existing_text_end_padding_id, cfg.existing_text_padding_id))
    for t, token in enumerate(tokens[0].tolist()):
        text.push(token, t)
    words = text.flush()
    return DialogueResult(audio=moshi, stereo=torch.cat([user, moshi]), words=words, text=text.text,
                          tokens=tokens.cpu(), seed=dialogue.seed, peak_batch=dialogue.peak_batch)


def run_dialogue(
    models: MoshiModels,
    user_audio: torch.Tensor | list[torch.Tensor],
    *,
    sampling: SamplingParams | None = None,
    seed: int | None = None,
    progress: Progress | None = None,
) -> DialogueResult | list[DialogueResult]:
    """Moshi's side of a conversation with each 24 kHz waveform [1, T] (a list is one batch,
    each file answered as if alone with `seed`). `progress(frames done, frames)` follows
    every step; an exception it raises (a cancellation) ends the dialogues."""
    batched = isinstance(user_audio, list)
    dialogues, users = encode_dialogues(models, user_audio if batched else [user_audio], sampling, seed)
    batch = DialogueBatch(models, slots=len(dialogues))
    batch.join(dialogues)
    while not batch.idle:
        for d in batch.step():
            if d.error is not None:
                raise d.error
        if progress is not None:
            progress(*progress_of(dialogues))
    results = [dialogue_result(models, d, user) for d, user in zip(dialogues, users)]
    return results if batched else results[0]
