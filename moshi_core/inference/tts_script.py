"""What a TTS model is given to say, and the rule that hands it the text one step at a time.

A script is a text, or the turns of a dialogue. It becomes a list of entries (`build_script`):
a `Say` per word (its tokens, and the pads forced after it) and a `Pause` per
`<break time="1.5s"/>` (or "300ms"), worth round(seconds * frame_rate) forced pads. On a
multi-speaker model, a turn's first word is led by its speaker's token, 1 for the first
voice and 2 for the other, whenever the speaker changes.

The model writes its own text stream but only chooses when the next entry starts: each
step it samples "a word starts" (TEXT_EPAD) or anything else, read as a pad. `TextFeed`
overrules it: no start while a word's tokens or forced pads remain, a forced start once
`max_padding` steps have passed without one; then it returns what the model is fed, the next token of the
current word or a pad. A model with a look-ahead stream (`lookahead = n`) also gets, on a
second stream, the start marker and then the tokens of the word n places ahead. Past the
last entry the script has ended: `end_step` is that step.

Nothing here needs the model: the API can check a script before any is loaded.
"""

import re
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from moshi_core.errors import InvalidParameterError
from moshi_core.formats.text import TEXT_EPAD, TEXT_PAD

TURN_TOKENS = (1, 2)  # lead a turn of the first voice, of the second one
MAX_BREAKS_SECONDS = 600.0  # all the pauses of one script together: beyond, surely a typo
# What the model never saw in training: made plain or dropped, as Kyutai's scripts do.
CLEAN_UP = str.maketrans({"\u2019": "'", ":": " ", "(": None, ")": None})
BREAK_TAG = re.compile(r"<break\b[^>]*>?")  # the tag; its attribute is read by `_break_seconds`
BREAK_TIME = re.compile(r"\s+time\s*=\s*([\"'])(.*?)\1\s*/?\s*")
PLAIN_NUMBER = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+")  # no sign, no exponent, no inf or nan


class Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class Say:
    """A word: its text, its tokens (speaker token included) and the pads forced after it."""

    text: str
    tokens: tuple[int, ...]
    pads: int = 0


@dataclass(frozen=True)
class Pause:
    """A `<break>`: pads forced before the next word may start."""

    pads: int


Entry = Say | Pause


def _break_seconds(tag: str) -> float:
    """`<break time="1.5s"/>` -> 1.5; a clear error for anything else."""
    attribute = BREAK_TIME.fullmatch(tag[len("<break"):].removesuffix(">")) if tag.endswith(">") else None
    if attribute is None:
        raise InvalidParameterError(f"{tag!r} is not a break: write <break time=\"1.5s\"/> or <break time=\"300ms\"/>")
    value = attribute.group(2).strip()
    for unit, seconds in (("ms", 1e-3), ("s", 1.0)):
        number = value.removesuffix(unit).strip()
        if value.endswith(unit) and PLAIN_NUMBER.fullmatch(number):
            return float(number) * seconds
    raise InvalidParameterError(
        f"break time {value!r}: give a plain number of seconds or milliseconds, such as \"1.5s\" or \"300ms\"")


def split_line(line: str) -> Iterator[str | float]:
    """A line -> its words (str) and its breaks (seconds), in order."""
    line = line.translate(CLEAN_UP)
    done = 0
    for tag in BREAK_TAG.finditer(line):
        yield from line[done : tag.start()].split()
        yield _break_seconds(tag.group())
        done = tag.end()
    yield from line[done:].split()


def build_script(tokenizer: Encoder, turns: Sequence[str], frame_rate: float = 12.5, multi_speaker: bool = True,
                 padding_between: int = 0) -> list[Entry]:
    """The turns of a dialogue (the first voice's first) -> the entries to feed."""
    entries: list[Entry] = []
    speaking: int | None = None  # the voice whose turn token was last given
    pause_seconds = 0.0
    for turn, line in enumerate(turns):
        voice = turn % len(TURN_TOKENS)
        for item in split_line(line):
            if isinstance(item, float):
                pause_seconds += item
                if pause_seconds > MAX_BREAKS_SECONDS:
                    raise InvalidParameterError(
                        f"the breaks add up to more than {MAX_BREAKS_SECONDS:.0f} s of silence: shorten them")
                entries.append(Pause(round(item * frame_rate)))
                continue
            tokens = tokenizer.encode(item)
            if multi_speaker and voice != speaking:
                tokens = [TURN_TOKENS[voice], *tokens]
                speaking = voice
            # Longer words get more room after them: every token past the first adds a pad.
            pads = max(0, padding_between + len(tokens) - 1) if padding_between > 0 else 0
            # A word the tokenizer has nothing for only holds the time of its padding.
            entries.append(Say(item, tuple(tokens), pads) if tokens else Pause(pads))
    return entries


@dataclass(frozen=True)
class FeedRules:
    """How one request's text is fed (the model's look-ahead, and the request's padding)."""

    lookahead: int = 0  # the second text stream shows the word this many places ahead; 0: no second stream
    max_padding: int = 8  # steps after a word's start (its tokens count) by which the next must start
    initial_padding: int = 2  # pads forced before the first word


@dataclass(frozen=True)
class Fed:
    """The text input of one step: the main stream's token, and the second stream's (None: nothing)."""

    main: int
    second: int | None = None


class TextFeed:
    """One request's script being fed, step by step: `next(step, sampled)` per step."""

    def __init__(self, entries: Sequence[Entry], rules: FeedRules) -> None:
        self.entries, self.rules = deque(entries), rules
        self.word_steps: list[tuple[str, int]] = []  # (word, the step it started)
        self.end_step: int | None = None  # the step at which the model asked for an entry past the last
        self._tokens: deque[int] = deque()  # the current word's tokens still to feed
        self._ahead: deque[int] = deque()  # the look-ahead stream's tokens still to feed
        self._forced = rules.initial_padding  # pads the model must still take
        self._patience = rules.initial_padding  # pads it may still choose before a word must start

    def next(self, step: int, sampled: int) -> Fed:
        """What the model is fed after it sampled `sampled` at `step`."""
        marked = self._start_entry(step) if self._may_start(sampled) else False
        if not marked:  # a pad step, whatever it carries
            self._patience = max(0, self._patience - 1)
            self._forced = max(0, self._forced - 1)
        main = TEXT_EPAD if marked else self._next_token()
        if not self.rules.lookahead:
            return Fed(main)
        if main == TEXT_EPAD:  # a start marker always goes on the second stream; the main one moves on
            return Fed(self._next_token(), TEXT_EPAD)
        return Fed(main, self._ahead.popleft() if self._ahead else None)

    def _may_start(self, sampled: int) -> bool:
        if self._tokens or self._forced > 0:
            return False
        return self._patience <= 0 or sampled == TEXT_EPAD

    def _next_token(self) -> int:
        return self._tokens.popleft() if self._tokens else TEXT_PAD

    def _start_entry(self, step: int) -> bool:
        """Take the next entry; True when a start marker is fed this step."""
        if not self.entries:
            first = self.end_step is None
            if first:
                self.end_step = step
            return first and self.rules.lookahead > 0  # the look-ahead stream sees the end once
        entry = self.entries.popleft()
        self._forced = entry.pads
        if isinstance(entry, Pause):
            return False
        self.word_steps.append((entry.text, step))
        self._tokens.extend(entry.tokens)
        if self.rules.lookahead:
            self._ahead.extend(self._word_ahead(self.rules.lookahead))
        self._patience = self.rules.max_padding
        return True

    def _word_ahead(self, n: int) -> tuple[int, ...]:
        """The tokens of the n-th word still queued (pauses not counted); () past the end."""
        words = (entry for entry in self.entries if isinstance(entry, Say))
        return next((w.tokens for i, w in enumerate(words, 1) if i == n), ())
