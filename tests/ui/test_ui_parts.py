"""The UI's parts on their own: the dialogue form, the error decorator, `app.py`'s flags."""

import inspect
import subprocess
import sys

import pytest
from servers import REPO_DIR


def test_dialogue_form_keeps_the_models_sampling_unless_asked():
    from moshi_core.params import SamplingOverrides
    from ui.dialogue import sampling_overrides

    own = sampling_overrides(True, 0.3, 0.4, False)
    assert own == SamplingOverrides()
    assert own.resolve({"temp": 0.5, "temp_text": 0.45}).for_stream(text=False)[0] == 0.5
    assert sampling_overrides(False, 0.3, 0.4, True) == SamplingOverrides(temp_text=0.3, temp_audio=0.4, greedy=True)


def test_one_decorator_shows_core_errors_in_the_page():
    import gradio as gr

    from moshi_core.errors import InvalidParameterError
    from ui.common import PROGRESS, shows_errors

    @shows_errors
    def handler(x: int, progress: gr.Progress = PROGRESS) -> int:
        raise InvalidParameterError(f"bad {x}")

    @shows_errors
    def stream(x: int):
        yield x
        raise InvalidParameterError("bad later")

    assert "progress" in inspect.signature(handler).parameters  # where Gradio finds its progress argument
    assert inspect.isgeneratorfunction(stream)  # so Gradio streams it
    with pytest.raises(gr.Error, match="bad 3"):
        handler(3)
    pieces = stream(1)
    assert next(pieces) == 1
    with pytest.raises(gr.Error, match="bad later"):
        next(pieces)


def _app_help(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "app.py", "--help"], check=False, cwd=REPO_DIR, capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", **env})


def test_flags_default_to_the_environment_and_a_bad_variable_is_one_line():
    done = _app_help(PORT="9123", MOSHI_LIVE_MAX_SECONDS="42")
    assert done.returncode == 0, done.stderr
    assert "default: 9123" in done.stdout and "default: 42.0" in done.stdout
    done = _app_help(MOSHI_LIVE_SLOTS="many")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "MOSHI_LIVE_SLOTS" in done.stderr
