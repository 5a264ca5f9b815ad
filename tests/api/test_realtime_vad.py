"""Server VAD in a `/v1/realtime` transcription session: the events the STT's pause head leads to.

The random tiny STT's heads say nothing useful, so the steps come from a script here: words
and pause probabilities as `TranscriptionDriver` hands them out.
"""

import asyncio
import json

from api.realtime import _Transcription
from api.realtime_events import EventWriter
from api.transcription_driver import TranscriptionEvent
from moshi_core.formats.text import Word


class ScriptedSession:
    """The session side of the driver: the scripted steps, then commits answered in turn."""

    def __init__(self, steps: list[TranscriptionEvent], last_words: list[Word]) -> None:
        self.queue: asyncio.Queue[TranscriptionEvent] = asyncio.Queue()
        for step in steps:
            self.queue.put_nowait(step)
        self.last_words, self.commits = last_words, 0

    def commit(self) -> None:
        self.commits += 1
        self.queue.put_nowait(TranscriptionEvent(self.last_words, committed=True))

    async def next_event(self) -> TranscriptionEvent:
        return await self.queue.get()


class Socket:
    def __init__(self) -> None:
        self.sent: list[dict] = []

    async def send_text(self, text: str) -> None:
        self.sent.append(json.loads(text))


def test_the_pause_head_stops_speech_and_commits_the_utterance_with_its_last_words():
    steps = [TranscriptionEvent([], 0.9),  # a pause before any word: no speech to stop
             TranscriptionEvent([Word("hello", 0.4, 0.7)], 0.1),
             TranscriptionEvent([], 0.2),
             TranscriptionEvent([Word("there", 0.8, 1.0)], 0.7),  # the speaker has finished
             TranscriptionEvent([], 0.9)]  # still pausing: the utterance is already committed
    session, ws = ScriptedSession(steps, [Word("friend", 1.0, 1.2)]), Socket()
    stream = _Transcription(ws, session, EventWriter(), 0.08, voice_activity=True)

    async def main():
        task = asyncio.create_task(stream.transcribe())
        while not any(e["type"].endswith("completed") for e in ws.sent):
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(asyncio.wait_for(main(), 5))
    kinds = [e["type"] for e in ws.sent]
    assert kinds == ["input_audio_buffer.speech_started", "conversation.item.input_audio_transcription.delta",
                     "conversation.item.input_audio_transcription.delta", "input_audio_buffer.speech_stopped",
                     "conversation.item.input_audio_transcription.delta", "input_audio_buffer.committed",
                     "conversation.item.input_audio_transcription.completed"]
    assert session.commits == 1
    started, stopped, completed = ws.sent[0], ws.sent[3], ws.sent[-1]
    assert started["audio_start_ms"] == 400 and stopped["audio_end_ms"] == 320  # 4 steps of 80 ms heard
    assert [e["delta"] for e in ws.sent if e["type"].endswith("delta")] == ["hello", " there", " friend"]
    assert completed["transcript"] == "hello there friend"
    assert len({e["item_id"] for e in ws.sent}) == 1


def test_without_server_vad_there_are_no_speech_events_and_only_the_client_commits():
    steps = [TranscriptionEvent([Word("hello", 0.4, 0.7)], 0.95), TranscriptionEvent([], 0.99)]
    session, ws = ScriptedSession(steps, []), Socket()
    stream = _Transcription(ws, session, EventWriter(), 0.08, voice_activity=True)
    stream._set_turn_detection(None)

    async def main():
        task = asyncio.create_task(stream.transcribe())
        while session.queue.qsize():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(main())
    assert [e["type"] for e in ws.sent] == ["conversation.item.input_audio_transcription.delta"]
    assert session.commits == 0
