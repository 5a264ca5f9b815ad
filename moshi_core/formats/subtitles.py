"""Transcripts in the formats they are read in: JSON, plain text, SubRip (.srt), WebVTT (.vtt)."""

import json
from dataclasses import dataclass

from moshi_core.formats.text import Word

# A new segment starts after a pause, or when one grows too long to read as a caption.
MAX_PAUSE = 1.0  # seconds
MAX_SECONDS = 6.0
MAX_WORDS = 14


@dataclass
class Segment:
    start: float
    end: float
    words: list[Word]

    @property
    def text(self) -> str:
        return " ".join(w.text for w in self.words)


def segments(words: list[Word]) -> list[Segment]:
    out: list[Segment] = []
    for word in words:
        last = out[-1] if out else None
        if (last is None or word.start - last.end > MAX_PAUSE or word.end - last.start > MAX_SECONDS
                or len(last.words) >= MAX_WORDS):
            out.append(Segment(word.start, word.end, [word]))
        else:
            last.words.append(word)
            last.end = max(last.end, word.end)
    return out


def _clock(seconds: float, decimal: str) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{decimal}{ms % 1000:03d}"


def to_srt(words: list[Word]) -> str:
    cues = [f"{i}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{s.text}\n"
            for i, s in enumerate(segments(words), 1)]
    return "\n".join(cues)


def to_vtt(words: list[Word]) -> str:
    cues = [f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{s.text}\n" for s in segments(words)]
    return "WEBVTT\n\n" + "\n".join(cues)


FORMATS = {"json": "json", "srt": "srt", "vtt": "vtt", "text": "txt"}  # format -> file suffix


def format_transcript(transcript, fmt: str, **extra) -> str:
    """A `stt.Transcript` as `json` (with `extra` keys), `text`, `srt` or `vtt`."""
    if fmt == "json":
        return json.dumps({**transcript.to_dict(), **extra}, ensure_ascii=False, indent=2) + "\n"
    if fmt == "text":
        return transcript.text + "\n"
    return to_srt(transcript.words) if fmt == "srt" else to_vtt(transcript.words)
