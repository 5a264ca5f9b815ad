"""Downloads from the Hub (a local stand-in): progress into the load, the HF cache layout, and
failing fast, once, when the Hub does not answer; the voice list asked for once.

`huggingface_hub` reads HF_ENDPOINT when imported, so each case runs in a fresh interpreter.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hub_stand_in import COMMIT, HubStandIn, silent_endpoint

from moshi_core.loading import hub

REACHED_NOT = "not in the Hugging Face cache and the Hub cannot be reached"


def run_against(endpoint: str, hf_home: Path, code: str) -> dict:
    """Run `code` (which prints one JSON line last) with the Hub at `endpoint`; its JSON."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1")
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


DOWNLOAD = """
    import json
    from moshi_core.loading.hub import resolve_file
    from moshi_core.loading.progress import LoadProgress

    record, seen = LoadProgress(), []
    record.subscribe(seen.append)
    with record.loading("mimi"):
        path = resolve_file("test/weights", ["missing.bin", "weights.bin"])
    print(json.dumps({"path": str(path), "seen": [s.to_dict() for s in seen]}))
"""

TWICE = """
    import json, time
    import huggingface_hub.file_download  # imported before the clock starts, as in a running server
    from moshi_core.errors import ModelSourceError
    from moshi_core.loading.hub import resolve_file

    answers = []
    for _ in range(2):
        start = time.monotonic()
        try:
            answers.append({"path": str(resolve_file("test/weights", ["missing.bin", "weights.bin"]))})
        except ModelSourceError as exc:
            answers.append({"error": str(exc)})
        answers[-1]["seconds"] = time.monotonic() - start
    print(json.dumps(answers))
"""


def test_a_download_reports_its_bytes_to_the_load_and_lands_in_the_hf_cache(tmp_path):
    data = os.urandom(300_000)
    with HubStandIn({"test/weights": {"weights.bin": data}}, slow={"weights.bin": 1_000_000}, chunk=50_000) as stand_in:
        answer = run_against(stand_in.url, tmp_path, DOWNLOAD)
    path = Path(answer["path"])
    assert path == tmp_path / "hub" / "models--test--weights" / "snapshots" / COMMIT / "weights.bin"
    assert path.read_bytes() == data
    downloads = [s for s in answer["seen"] if s["stage"] == "downloading"]
    assert downloads and all(s["file"] == "weights.bin" and s["total"] == len(data) for s in downloads)
    assert downloads[-1]["done"] == len(data) and "rate" in downloads[-1]
    assert answer["seen"][-2]["stage"] == "loading weights" and answer["seen"][-1]["stage"] == "ready"


def test_an_unreachable_hub_fails_fast_with_the_message_then_at_once(tmp_path):
    with silent_endpoint() as url:
        first, second = run_against(url, tmp_path, TWICE)
    for answer in (first, second):
        assert answer["error"].startswith("cannot fetch test/weights (none of missing.bin, weights.bin): ")
        assert REACHED_NOT in answer["error"]
    # huggingface_hub alone retries for about 25 s; the second is not asked at all.
    assert first["seconds"] < 5 and second["seconds"] < 1


def test_a_cached_file_is_used_when_the_hub_does_not_answer_even_after_a_name_that_is_not(tmp_path):
    data = b"weights" * 1000
    with HubStandIn({"test/weights": {"weights.bin": data}}) as stand_in:
        cached = run_against(stand_in.url, tmp_path, TWICE)[0]["path"]
    with silent_endpoint() as url:
        first, second = run_against(url, tmp_path, TWICE)
    assert first["path"] == second["path"] == cached and Path(cached).read_bytes() == data


VOICES = """
    import json
    from moshi_core.loading.voices import VoiceRepo

    repo = VoiceRepo("test/voices", ".sig@1.safetensors")
    print(json.dumps([repo.names(), repo.names()]))
"""


@pytest.mark.slow  # its interpreter imports torch (voices.py does)
def test_the_voice_list_is_asked_for_once(tmp_path):
    voices = {"a/one.sig@1.safetensors": b"1", "two.sig@1.safetensors": b"2", "two.other@2.safetensors": b"3"}
    with HubStandIn({"test/voices": voices}) as stand_in:
        first, second = run_against(stand_in.url, tmp_path, VOICES)
    assert first == second == ["a/one", "two"]
    assert len([r for r in stand_in.requests if "/tree/" in r]) == 1


class FailingSession:
    def __init__(self) -> None:
        self.calls = 0

    def head(self, url: str, timeout: float) -> None:
        self.calls += 1
        raise ConnectionError("no route to host")


def test_an_unreachable_hub_is_asked_again_after_a_while(monkeypatch):
    import huggingface_hub.utils

    session, now = FailingSession(), [100.0]
    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: session)
    monkeypatch.setattr(hub.time, "monotonic", lambda: now[0])
    reach = hub._HubReachability()
    assert not reach.reachable() and not reach.reachable()
    assert session.calls == 1
    now[0] += hub.UNREACHABLE_SECONDS + 1
    assert not reach.reachable()
    assert session.calls == 2
