"""`/v1/realtime`: OpenAI's Realtime API over a websocket, on Moshi and Kyutai's STT (docs/realtime.md).

Two kinds of session, as OpenAI's URL says:

- `?intent=transcription`: Kyutai's STT transcribes the audio appended, word by word
  (`conversation.item.input_audio_transcription.delta`), an utterance ending at the client's
  `input_audio_buffer.commit` or, where the model has voice-activity heads, when they say the
  speaker has finished (server VAD: `input_audio_buffer.speech_started` / `speech_stopped`);
- `?model=<Moshi>`: a full-duplex conversation. Moshi listens and speaks at once, all the
  time: the session is one long response (`response.created` at the start), its audio
  (`response.output_audio.delta`) and its text (`response.output_audio_transcript.delta`)
  streamed while the caller's audio comes in. `session.update` sets the sampling and seed
  until the first audio.

Both run on the batched engines, one slot per session. A conversation takes a slot of the
same `LiveDriver` as `/api/chat`, and counts against the same per-key limit, so the two doors
never overbook it. API keys are `KeyGuard`'s (`Authorization: Bearer`, as OpenAI's clients
send it). Errors are `error` events; a client event we do not serve is answered with one and
ignored. A session that cannot go on (no free slot, a draining server, the time limit, no
audio for `idle_seconds`, the model's failure) gets its `error` event and then the close.
"""

import asyncio
import collections
import json
from collections.abc import Collection, Mapping
from typing import Any

from fastapi import APIRouter, WebSocket

from moshi_core.errors import InvalidParameterError, LiveBusyError, LiveInputError, MoshiError
from moshi_core.params import SamplingParams

from .chat import GONE, parse_session_args, run_both
from .errors import status_of
from .limits import WS_MAX_SIZE
from .live_driver import LiveDriver, LiveSession
from .realtime_events import EventWriter, check_input_format, client_event_type, decode_audio, encode_audio, new_id, \
    pcm_format
from .transcription_driver import TranscriptionDriver, TranscriptionSession

# session.update fields that set Moshi's sampling: ours, named as /api/chat's query arguments,
# and the beta API's `temperature` (both streams).
SAMPLING_FIELDS = ("text_temperature", "text_topk", "audio_temperature", "audio_topk", "seed")
VAD_THRESHOLD = 0.5  # pause probability past which the speaker has finished, as Kyutai's server reads it
TRANSCRIPTION_MODEL = "kyutai-stt"


class _Closing(Exception):
    """The session ends: its error event is sent, then the socket closes with `code`."""

    def __init__(self, event: dict, code: int) -> None:
        super().__init__(event["error"]["message"])
        self.event, self.code = event, code


async def _send(ws: WebSocket, event: dict) -> None:
    await ws.send_text(json.dumps(event))


async def _close_with(ws: WebSocket, event: dict, code: int) -> None:
    try:
        await _send(ws, event)
        await ws.close(code)
    except GONE:
        pass


async def _client_events(ws: WebSocket, out: EventWriter, idle_seconds: float):
    """The client's events as dicts; a malformed one is answered with an error event and skipped."""
    while True:
        try:
            message = await asyncio.wait_for(ws.receive(), idle_seconds)
        except TimeoutError:
            raise _Closing(out.error("idle", f"no client event for {idle_seconds:g} s, the session ended"),
                           1000) from None
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text")
        if text is None or len(text) > WS_MAX_SIZE:
            await _send(ws, out.error("invalid_event", "every client event is a JSON text message (of at most "
                                                       f"{WS_MAX_SIZE} bytes)"))
            continue
        try:
            event = json.loads(text)
            if not isinstance(event, dict):
                raise ValueError
            event["type"] = client_event_type(event)
        except (ValueError, InvalidParameterError):
            await _send(ws, out.error("invalid_event", "every client event is a JSON object with a string `type`"))
            continue
        yield event


async def _append(ws: WebSocket, out: EventWriter, session: LiveSession | TranscriptionSession,
                  event: dict) -> None:
    """`input_audio_buffer.append`: the audio to the session; bad audio is an error event, audio
    faster than real time ends the session."""
    try:
        session.push(decode_audio(event))
    except LiveInputError as exc:
        raise _Closing(out.error("input_too_fast", str(exc), "audio", event.get("event_id")), 1008) from None
    except InvalidParameterError as exc:
        await _send(ws, _error_for(out, exc, event, "audio"))


def _error_for(out: EventWriter, exc: MoshiError, event: Mapping[str, Any], param: str | None = None) -> dict:
    status, code = status_of(exc)
    return out.error(code, str(exc), param, event.get("event_id"), status)


class _Conversation:
    """One Moshi session: the caller's events in, Moshi's audio and text out."""

    def __init__(self, ws: WebSocket, driver: LiveDriver, session: LiveSession, sampling: SamplingParams,
                 model: str, out: EventWriter) -> None:
        self.ws, self.driver, self.session, self.out = ws, driver, session, out
        self.sampling, self.seed, self.model = sampling, None, model
        self.response_id, self.item_id = new_id("resp"), new_id("item")

    def description(self) -> dict:
        return {"type": "realtime", "object": "realtime.session", "id": self.response_id.replace("resp", "sess"),
                "model": self.model, "output_modalities": ["audio"],
                "audio": {"input": {"format": pcm_format(), "turn_detection": None},
                          "output": {"format": pcm_format()}},
                "text_temperature": self.sampling.temp_text, "audio_temperature": self.sampling.temp,
                "text_topk": self.sampling.top_k_text, "audio_topk": self.sampling.top_k, "seed": self.seed}

    async def start(self) -> None:
        await _send(self.ws, self.out.event("session.created", session=self.description()))
        response = {"id": self.response_id, "object": "realtime.response", "status": "in_progress",
                    "output_modalities": ["audio"], "output": []}
        await _send(self.ws, self.out.event("response.created", response=response))
        item = {"id": self.item_id, "type": "message", "object": "realtime.item", "role": "assistant",
                "status": "in_progress", "content": []}
        await _send(self.ws, self.out.event("response.output_item.added", response_id=self.response_id,
                                            output_index=0, item=item))

    async def receive(self, idle_seconds: float) -> None:
        async for event in _client_events(self.ws, self.out, idle_seconds):
            kind = event["type"]
            if kind == "input_audio_buffer.append":
                await _append(self.ws, self.out, self.session, event)
            elif kind == "session.update":
                await self._update(event)
            elif kind == "input_audio_buffer.commit":  # Moshi has heard it already: nothing waits
                await _send(self.ws, self.out.event("input_audio_buffer.committed", item_id=new_id("item"),
                                                    previous_item_id=None))
            else:
                await _send(self.ws, self.out.error(
                    "unsupported_event", f"{kind!r} is not served here: Moshi listens and speaks continuously, "
                    "so a conversation takes input_audio_buffer.append, input_audio_buffer.commit and "
                    "session.update", "type", event.get("event_id")))

    async def _update(self, event: Mapping[str, Any]) -> None:
        session = event.get("session") or {}
        try:
            if not isinstance(session, Mapping):
                raise InvalidParameterError("session.update needs a `session` object")
            check_input_format(session)
            given = {k: str(session[k]) for k in SAMPLING_FIELDS if session.get(k) is not None}
            if session.get("temperature") is not None:  # the beta API's one temperature: both streams
                given = {"text_temperature": str(session["temperature"]),
                         "audio_temperature": str(session["temperature"]), **given}
            if given:
                sampling, seed, _ = parse_session_args(given, self.sampling)
                seed = self.seed if "seed" not in given else seed
                await self.driver.configure(self.session, sampling, seed)
                self.sampling, self.seed = sampling, seed
        except MoshiError as exc:
            await _send(self.ws, _error_for(self.out, exc, event, "session"))
            return
        await _send(self.ws, self.out.event("session.updated", session=self.description()))

    async def speak(self) -> None:
        while True:
            frame = await self.session.next_frame()
            if frame.error is not None:
                raise _Closing(self.out.error("model_error", frame.error, status=500), 1011)
            common = {"response_id": self.response_id, "item_id": self.item_id, "output_index": 0,
                      "content_index": 0}
            if frame.audio is not None:
                await _send(self.ws, self.out.event("response.output_audio.delta", delta=encode_audio(frame.audio),
                                                    **common))
            if frame.text:
                await _send(self.ws, self.out.event("response.output_audio_transcript.delta", delta=frame.text,
                                                    **common))


class _Transcription:
    """One STT session: the caller's audio in, its words out, an item per utterance."""

    def __init__(self, ws: WebSocket, session: TranscriptionSession, out: EventWriter, frame_seconds: float,
                 voice_activity: bool) -> None:
        self.ws, self.session, self.out = ws, session, out
        self.frame_seconds, self.voice_activity = frame_seconds, voice_activity
        self.frames = 0  # of the caller's audio transcribed, for the VAD events' times
        self.server_vad = voice_activity
        self._new_item()

    def _new_item(self) -> None:
        self.item_id, self.words, self.item_start = new_id("item"), [], self.frames
        self.speaking = self.ending = False  # ending: the VAD has committed, the last words are on their way

    def description(self) -> dict:
        vad = {"type": "server_vad", "threshold": VAD_THRESHOLD} if self.server_vad else None
        name = "transcription_session" if self.out.beta else "session"
        return {"type": "transcription", "object": f"realtime.{name}",
                "audio": {"input": {"format": pcm_format(), "transcription": {"model": TRANSCRIPTION_MODEL},
                                    "turn_detection": vad}}}

    async def start(self) -> None:
        await _send(self.ws, self.out.event("session.created", session=self.description()))

    async def receive(self, idle_seconds: float) -> None:
        async for event in _client_events(self.ws, self.out, idle_seconds):
            kind = event["type"]
            if kind == "input_audio_buffer.append":
                await _append(self.ws, self.out, self.session, event)
            elif kind == "input_audio_buffer.commit":
                self.session.commit()
            elif kind == "input_audio_buffer.clear":
                self.session.clear()
                await _send(self.ws, self.out.event("input_audio_buffer.cleared"))
            elif kind == "session.update":
                await self._update(event)
            else:
                await _send(self.ws, self.out.error(
                    "unsupported_event", f"{kind!r} is not served in a transcription session: it takes "
                    "input_audio_buffer.append, .commit, .clear and session.update", "type", event.get("event_id")))

    async def _update(self, event: Mapping[str, Any]) -> None:
        session = event.get("session") or {}
        try:
            if not isinstance(session, Mapping):
                raise InvalidParameterError("session.update needs a `session` object")
            check_input_format(session)
            audio_input = (session.get("audio") or {}).get("input") or {}
            for turns in (session.get("turn_detection", ...), audio_input.get("turn_detection", ...)):
                if turns is not ...:
                    self._set_turn_detection(turns)
        except MoshiError as exc:
            await _send(self.ws, _error_for(self.out, exc, event, "session"))
            return
        kind = "transcription_session.updated" if self.out.beta else "session.updated"
        await _send(self.ws, self.out.event(kind, session=self.description()))

    def _set_turn_detection(self, turns: Any) -> None:
        if turns is None:
            self.server_vad = False
        elif isinstance(turns, Mapping) and turns.get("type") == "server_vad":
            if not self.voice_activity:
                raise InvalidParameterError("this STT model has no voice-activity heads: end each utterance "
                                            "with input_audio_buffer.commit (turn_detection: null)")
            self.server_vad = True
        else:
            raise InvalidParameterError(f"turn_detection is server_vad or null here, not {turns!r}")

    async def transcribe(self) -> None:
        while True:
            event = await self.session.next_event()
            if event.error is not None:
                raise _Closing(self.out.error("model_error", event.error, status=500), 1011)
            self.frames += not event.committed
            for word in event.words:
                if self.server_vad and not self.speaking and not self.ending:
                    self.speaking = True
                    await _send(self.ws, self.out.event("input_audio_buffer.speech_started", item_id=self.item_id,
                                                        audio_start_ms=round(word.start * 1000)))
                delta = word.text if not self.words else " " + word.text
                self.words.append(word.text)
                await _send(self.ws, self.out.event("conversation.item.input_audio_transcription.delta",
                                                    item_id=self.item_id, content_index=0, delta=delta))
            if event.committed:
                await self._complete()
            elif self.server_vad and self.speaking and event.pause is not None and event.pause > VAD_THRESHOLD:
                await _send(self.ws, self.out.event("input_audio_buffer.speech_stopped", item_id=self.item_id,
                                                    audio_end_ms=round(self.frames * self.frame_seconds * 1000)))
                self.session.commit()
                self.speaking, self.ending = False, True

    async def _complete(self) -> None:
        await _send(self.ws, self.out.event("input_audio_buffer.committed", item_id=self.item_id,
                                            previous_item_id=None))
        await _send(self.ws, self.out.event("conversation.item.input_audio_transcription.completed",
                                            item_id=self.item_id, content_index=0, transcript=" ".join(self.words),
                                            usage={"type": "duration", "seconds": round(
                                                (self.frames - self.item_start) * self.frame_seconds, 3)}))
        self._new_item()


def create_realtime_router(live: LiveDriver, transcription: TranscriptionDriver, models: Collection[str],
                           max_seconds: float, idle_seconds: float = 30.0, max_per_key: int = 1,
                           open_per_key: collections.Counter[str] | None = None) -> APIRouter:
    """`/v1/realtime`; `models`: the names `?model=` may give Moshi by; `open_per_key`: the
    count `/api/chat` keeps (`create_chat_router`'s), so one key's conversations at both doors add up."""
    router = APIRouter(tags=["live"])
    open_per_key = collections.Counter() if open_per_key is None else open_per_key

    @router.websocket("/v1/realtime")
    async def realtime(ws: WebSocket) -> None:
        await ws.accept()
        out = EventWriter()
        out.beta = ws.headers.get("openai-beta", "").startswith("realtime=v1")
        key = ws.scope.get("state", {}).get("api_key", "")
        if key and open_per_key[key] >= max_per_key:
            await _close_with(ws, out.error("busy", f"this API key already has {open_per_key[key]} session(s) open, "
                                                    "the most one key may hold at once; end one and try again",
                                            status=429), 1013)
            return
        open_per_key[key] += 1  # checked and counted with no await between, as /api/chat does
        try:
            async with asyncio.timeout(max_seconds):
                await _serve(ws, out)
        except TimeoutError:
            await _close_with(ws, out.error("time_limit", f"sessions end after {max_seconds:g} s"), 1000)
        except _Closing as closing:
            await _close_with(ws, closing.event, closing.code)
        except GONE:
            pass
        finally:
            open_per_key[key] -= 1
            if not open_per_key[key]:
                del open_per_key[key]

    async def _serve(ws: WebSocket, out: EventWriter) -> None:
        query = ws.query_params
        if query.get("intent") == "transcription":
            await _serve_transcription(ws, out)
            return
        model = query.get("model")
        if model not in models:
            raise _Closing(out.error("model_not_found", f"no model {model!r} here: a conversation is with "
                                     f"{' or '.join(sorted(models))}; a transcription takes ?intent=transcription",
                                     "model", status=404), 1008)
        try:
            engine = await live.engine()
            session = await live.open()
        except MoshiError as exc:
            raise _Closing(_busy_or_failed(out, exc, len(live.sessions)), 1013 if _busy(exc) else 1011) from None
        try:
            conversation = _Conversation(ws, live, session, engine.sampling, model, out)
            await conversation.start()
            await run_both(conversation.receive(idle_seconds), conversation.speak())
        finally:
            await live.close(session)

    async def _serve_transcription(ws: WebSocket, out: EventWriter) -> None:
        try:
            engine = await transcription.engine()
            session = await transcription.open()
        except MoshiError as exc:
            raise _Closing(_busy_or_failed(out, exc, len(transcription.sessions)),
                           1013 if _busy(exc) else 1011) from None
        try:
            stream = _Transcription(ws, session, out, 1 / engine.frame_rate, engine.has_voice_activity)
            await stream.start()
            await run_both(stream.receive(idle_seconds), stream.transcribe())
        finally:
            await transcription.close(session)

    return router


def _busy(exc: MoshiError) -> bool:
    return isinstance(exc, LiveBusyError)


def _busy_or_failed(out: EventWriter, exc: MoshiError, open_now: int) -> dict:
    if _busy(exc):
        return out.error("busy", f"{exc} ({open_now} in progress); try again in a moment", status=429)
    status, code = status_of(exc)
    return out.error(code, f"the model could not be loaded: {exc}", status=status)
