"""The text side of TTS: words to feed, and the state machine that feeds them.

Kyutai's TTS model writes its own text stream, one token per 80 ms step, but it only
chooses *when* the next word starts: at each step it samples "new word" (0) or "pad" (3).
On "new word" the next queued word is popped and its tokens are fed over the following
steps. This module turns a script into those words (`script_to_words`) and keeps, per
request, what is left to feed (`FeedState`, advanced by `TextFeeder.next_input`).

Rules, from Kyutai's model card and reference (reference 7.2):
- any sampled token other than 0 or 3 counts as pad; while a word's tokens are still being
  fed, or forced padding remains, the model pads; after `max_padding` pads in a row it must
  start a word;
- `initial_padding` forced pads at the start, `padding_between` extra pads after each word
  (grown by the word's length), `<break time="1.5s"/>` forces round(1.5 * 12.5) pads;
- a multi-speaker model gets speaker-turn tokens (1, 2) before each turn's first word;
- with `second_stream_ahead = n`, a second text stream shows the tokens of the word n
  places ahead, multiplexed into the same input token: `(second + 1) * card + main`.
"""

import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

NEW_WORD = 0
PAD = 3
SPEAKER_TOKENS = (1, 2)  # start of a turn of the main speaker, of the other speaker
NO_TOKEN = -1  # embeds to zero: "nothing" on the look-ahead stream

BREAK_OR_SPACE = re.compile(r"(?:<break\s+time=\"([0-9]+(?:.[0-9]*)?)s\"\s*/?>)|(?:\s+)")
# Characters the model was not trained on, removed or made spaces, as Kyutai does.
REPLACEMENTS = (("\u2019", "'"), (":", " "), ("(", ""), (")", ""))


class Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


@dataclass
class ScriptWord:
    """One entry of the script: a word's tokens, or a pause (no tokens, only padding)."""

    tokens: list[int]
    text: str
    padding: int = 0  # pads forced after this entry is taken


def script_to_words(tokenizer: Encoder, turns: Sequence[str], frame_rate: float = 12.5,
                    multi_speaker: bool = True, padding_between: int = 0) -> list[ScriptWord]:
    """Turns of a dialogue (first turn: main speaker) -> the words to feed, pauses included."""
    words: list[ScriptWord] = []
    last_speaker: int | None = None
    for turn_index, line in enumerate(turns):
        speaker = turn_index % len(SPEAKER_TOKENS)
        first_in_turn = True
        for piece, pause in _split(line):
            if pause is not None:
                words.append(ScriptWord([], "", round(pause * frame_rate)))
                continue
            tokens = tokenizer.encode(piece)
            if first_in_turn and multi_speaker and speaker != last_speaker:
                tokens.insert(0, SPEAKER_TOKENS[speaker])
                last_speaker = speaker
            first_in_turn = False
            padding = max(0, padding_between + len(tokens) - 1) if padding_between > 0 else 0
            words.append(ScriptWord(tokens, piece, padding))
    return words


def _split(line: str) -> list[tuple[str, float | None]]:
    """A line -> its words (word, None) and pauses ("", seconds), in order."""
    for old, new in REPLACEMENTS:
        line = line.replace(old, new)
    out: list[tuple[str, float | None]] = []
    while line:
        match = BREAK_OR_SPACE.search(line)
        if match is None:
            break
        word, line = line[: match.start()], line[match.end():]
        if word:
            out.append((word, None))
        if match.group(1):
            out.append(("", float(match.group(1))))
    if line:
        out.append((line, None))
    return out


@dataclass
class FeedState:
    """What remains to feed for one request, and what was fed when."""

    words: deque[ScriptWord]
    pads_left: int  # pads the model may still choose before it must start a word
    forced_pads: int  # pads the model must still take
    queued: deque[int] = field(default_factory=deque)  # tokens of the current word
    ahead_queued: deque[int] = field(default_factory=deque)  # look-ahead stream tokens
    end_step: int | None = None  # the step at which the model asked for a word past the last
    word_steps: list[tuple[str, int]] = field(default_factory=list)  # (word, step it started)

    def tokens_ahead(self, ahead: int) -> list[int]:
        """The tokens of the `ahead`-th next word that has tokens (pauses do not count)."""
        for word in self.words:
            if word.tokens:
                ahead -= 1
                if ahead == 0:
                    return word.tokens
        return []


@dataclass
class TextFeeder:
    """Turns the model's sampled text token into the token it is fed next, per request."""

    card: int  # text input cardinality (text_card + 1), the base of the multiplexing
    second_stream_ahead: int = 0
    max_padding: int = 8
    initial_padding: int = 2

    def start(self, words: Sequence[ScriptWord]) -> FeedState:
        return FeedState(deque(words), pads_left=self.initial_padding, forced_pads=self.initial_padding)

    def next_input(self, step: int, state: FeedState, sampled: int) -> int:
        """The text input token after the model sampled `sampled` at `step`."""
        choice = sampled if sampled in (NEW_WORD, PAD) else PAD
        if state.queued or state.forced_pads > 0:
            choice = PAD
        elif state.pads_left <= 0:
            choice = NEW_WORD
        if choice == NEW_WORD:
            choice = self._take_word(step, state)
        if choice == PAD:
            state.pads_left = max(0, state.pads_left - 1)
            state.forced_pads = max(0, state.forced_pads - 1)
            main = state.queued.popleft() if state.queued else PAD
        else:
            main = NEW_WORD
        if not self.second_stream_ahead:
            return main
        second = NO_TOKEN
        if main == NEW_WORD:
            # The word marker goes on the second stream; the main one moves on to the word.
            second = NEW_WORD
            main = state.queued.popleft() if state.queued else PAD
        elif state.ahead_queued:
            second = state.ahead_queued.popleft()
        return (second + 1) * self.card + main

    def _take_word(self, step: int, state: FeedState) -> int:
        """Pop the next word on a "new word" choice; returns the choice that stands."""
        if not state.words:
            # Past the last word: the end. A model with a look-ahead stream sees the marker once.
            choice = NEW_WORD if self.second_stream_ahead and state.end_step is None else PAD
            if state.end_step is None:
                state.end_step = step
            return choice
        word = state.words.popleft()
        state.forced_pads = word.padding
        if not word.tokens:  # a pause
            return PAD
        state.word_steps.append((word.text, step))
        state.queued.extend(word.tokens)
        if self.second_stream_ahead:
            state.ahead_queued.extend(state.tokens_ahead(self.second_stream_ahead))
        state.pads_left = self.max_padding
        return NEW_WORD
