"""Moshi's text stream: SentencePiece pieces to words with timestamps, as they arrive.

Moshi emits one text token per 80 ms step: mostly padding (`TEXT_PAD`; `TEXT_EPAD` marks the
end of a pause before a word), and now and then a SentencePiece piece. A piece starting with
"▁" begins a new word. A word's start is the time of its first piece and its end the time
of its last piece plus one frame.
"""

import os
from dataclasses import asdict, dataclass

from moshi_core.errors import CheckpointError

WORD_START = "\u2581"  # SentencePiece's "▁"
# Kyutai's text-stream conventions (a model config's `existing_text_*_id` says the same where
# it is at hand). Ids 0..TEXT_PAD are control pieces: they never carry text.
TEXT_EPAD = 0  # end of padding: the next token starts a word (STT writes it; TTS samples it to start one)
TEXT_PAD = 3  # padding: no text at this step


@dataclass
class Word:
    text: str
    start: float  # seconds
    end: float

    def to_dict(self) -> dict:
        return asdict(self)


class TextTokenizer:
    """A SentencePiece model (`tokenizer_spm_32k_3.model` for Moshi)."""

    def __init__(self, path: str | os.PathLike) -> None:
        import sentencepiece

        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=os.fspath(path))
        except (OSError, RuntimeError) as exc:
            raise CheckpointError(f"{path} is not a SentencePiece model: {exc}") from exc

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    def piece(self, token: int) -> str | None:
        """The piece of a token, or None for control and out-of-vocabulary tokens."""
        if not 0 <= token < len(self) or self.sp.is_control(token) or self.sp.is_unknown(token):
            return None
        return self.sp.id_to_piece(token)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, tokens: list[int]) -> str:
        return self.sp.decode([t for t in tokens if self.piece(t) is not None])


class TextStream:
    """Streaming detokenizer: feed one token per step, read the text and the timed words."""

    def __init__(self, tokenizer: TextTokenizer, frame_rate: float = 12.5, skip: tuple[int, ...] = (TEXT_EPAD, TEXT_PAD)) -> None:
        self.tokenizer, self.frame_duration, self.skip = tokenizer, 1 / frame_rate, set(skip)
        self.words: list[Word] = []
        self._current: Word | None = None

    def push(self, token: int, frame: int) -> str:
        """Add the token of step `frame`; returns the text it adds ('' for padding)."""
        if token in self.skip:
            return ""
        piece = self.tokenizer.piece(token)
        if piece is None:
            return ""
        start, end = frame * self.frame_duration, (frame + 1) * self.frame_duration
        starts_word = piece.startswith(WORD_START)
        piece_text = piece.replace(WORD_START, " ")
        if starts_word or self._current is None:
            self._finish()
            self._current = Word(piece_text.strip(), start, end)
        else:
            self._current.text += piece_text
            self._current.end = end
        return piece_text

    def _finish(self) -> None:
        if self._current is not None and self._current.text:
            self.words.append(self._current)
        self._current = None

    def flush(self) -> list[Word]:
        """Close the last word; returns every word of the stream."""
        self._finish()
        return self.words

    @property
    def text(self) -> str:
        words = self.words + ([self._current] if self._current is not None and self._current.text else [])
        return " ".join(w.text for w in words)
