"""The TTS script: words, breaks and speaker turns, and the rule that feeds them step by step.

The feeding rule is checked against Kyutai's state machine (`moshi==0.2.13`, test oracle
only) on random choices of the model, with and without the look-ahead stream.
"""

import random

import pytest

from moshi_core.errors import InvalidParameterError
from moshi_core.formats.text import TEXT_EPAD, TEXT_PAD, TextTokenizer
from moshi_core.inference.tts_script import (
    MAX_BREAKS_SECONDS,
    Fed,
    FeedRules,
    Pause,
    Say,
    TextFeed,
    build_script,
    split_line,
)

CARD = 65  # the tiny TTS model's text_card + 1


class Letters:
    """One token per letter (10 + its position in the alphabet): predictable token counts."""

    def encode(self, text: str) -> list[int]:
        return [10 + ord(c) - ord("a") for c in text.lower() if c.isalpha()]


def test_a_line_splits_into_words_and_breaks():
    line = 'one two<break time="1.5s"/>three <break time="300ms" /> (four): l\u2019ami <break time=\'2s\'>'
    assert list(split_line(line)) == ["one", "two", 1.5, "three", 0.3, "four", "l'ami", 2.0]
    assert list(split_line("  breakfast <breaking> news ")) == ["breakfast", "<breaking>", "news"]


@pytest.mark.parametrize("tag", ['<break time="1x5s"/>', '<break time="1e999s"/>', '<break time="-1s"/>',
                                 '<break time="inf s"/>', '<break time="2"/>', '<break time="s"/>',
                                 '<break/>', '<break time="1s"', '<break length="1s"/>'])
def test_a_malformed_break_is_refused_clearly(tag):
    with pytest.raises(InvalidParameterError, match="break"):
        build_script(Letters(), [f"hello {tag} you"])


def test_breaks_adding_up_to_more_than_ten_minutes_are_refused():
    assert build_script(Letters(), [f'a <break time="{MAX_BREAKS_SECONDS:.0f}s"/> b'])[1] == Pause(7500)
    with pytest.raises(InvalidParameterError, match="add up to more than 600 s"):
        build_script(Letters(), ['a <break time="400s"/> b', 'c <break time="200001ms"/>'])
    with pytest.raises(InvalidParameterError, match="add up"):
        build_script(Letters(), ['a <break time="' + "9" * 400 + 's"/>'])


def test_script_entries_speaker_turns_and_padding():
    entries = build_script(Letters(), ["hi there", 'ok <break time="1.5s"/>', "bye"], padding_between=1)
    assert entries == [
        Say("hi", (1, 17, 18), 3),  # the first voice's turn token, then 2 letters: 1 + 3 - 1 pads
        Say("there", (29, 17, 14, 27, 14), 5),
        Say("ok", (2, 24, 20), 3),  # the other voice's turn
        Pause(19),  # round(1.5 * 12.5)
        Say("bye", (1, 11, 34, 14), 4),
    ]
    single = build_script(Letters(), ["hi", "yo"], multi_speaker=False)
    assert single == [Say("hi", (17, 18)), Say("yo", (34, 24))]


def _run(feed: TextFeed, choices: list[int]) -> list[Fed]:
    return [feed.next(step, choice) for step, choice in enumerate(choices)]


def test_feed_pads_first_then_feeds_a_word_when_the_model_starts_one():
    feed = TextFeed(build_script(Letters(), ["ab cd"], multi_speaker=False), FeedRules(max_padding=3))
    # Two forced pads (a "start" then is overruled), a start, the word's tokens whatever the
    # model chose; three steps after the word began, a start is forced; then the end.
    fed = _run(feed, [TEXT_EPAD, TEXT_PAD, TEXT_EPAD, 7, 7, TEXT_PAD, TEXT_PAD, TEXT_PAD, TEXT_PAD, 7, TEXT_EPAD])
    assert [f.main for f in fed] == [3, 3, TEXT_EPAD, 10, 11, 3, TEXT_EPAD, 12, 13, 3, 3]
    assert all(f.second is None for f in fed)
    assert feed.word_steps == [("ab", 2), ("cd", 6)] and feed.end_step == 10
    assert feed.next(11, TEXT_EPAD) == Fed(TEXT_PAD) and feed.end_step == 10


def test_feed_look_ahead_stream():
    rules = FeedRules(lookahead=1, max_padding=2, initial_padding=0)
    feed = TextFeed(build_script(Letters(), ["ab c"], multi_speaker=False), rules)
    fed = _run(feed, [TEXT_EPAD, TEXT_PAD, TEXT_EPAD, TEXT_PAD, TEXT_EPAD, TEXT_EPAD])
    # The start marker goes on the second stream while the word begins on the main one; the
    # second stream then shows the next word; past the end, the marker once.
    assert fed == [Fed(10, TEXT_EPAD), Fed(11, 12), Fed(12, TEXT_EPAD), Fed(3, None), Fed(3, TEXT_EPAD),
                   Fed(3, None)]
    assert feed.end_step == 4


@pytest.mark.parametrize("lookahead", [0, 2])
def test_feed_matches_the_reference_state_machine(tokenizer_model, lookahead):
    from moshi.models.tts import StateMachine, TokenIds, script_to_entries

    tokenizer = TextTokenizer(tokenizer_model)
    turns = ["hello how are you", 'bonjour: <break time="0.3s"/> paris (today)', "ok"]
    ids = TokenIds(CARD)
    ref_entries = script_to_entries(tokenizer.sp, ids, 12.5, turns, multi_speaker=True, padding_between=1)
    ours = build_script(tokenizer, turns, 12.5, multi_speaker=True, padding_between=1)
    assert [tuple(e.tokens) if e.tokens else () for e in ref_entries] == [getattr(e, "tokens", ()) for e in ours]
    for seed in range(20):
        rng = random.Random(seed)
        choices = [rng.choice([TEXT_EPAD, TEXT_PAD, TEXT_PAD, 5, 40]) for _ in range(120)]
        machine = StateMachine(ids, second_stream_ahead=lookahead, max_padding=4, initial_padding=2)
        state = machine.new_state(ref_entries)
        expected = [machine.process(step, state, choice)[0] for step, choice in enumerate(choices)]
        feed = TextFeed(ours, FeedRules(lookahead, max_padding=4, initial_padding=2))
        got = [f.main if not lookahead else ((-1 if f.second is None else f.second) + 1) * CARD + f.main
               for f in _run(feed, choices)]
        assert got == expected
        assert feed.word_steps == state.transcript and feed.end_step == state.end_step
