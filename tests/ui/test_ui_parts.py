"""The UI's parts on their own: the dialogue form, the error decorator, the result boxes, `app.py`'s flags."""

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


def test_results_that_feed_another_step_are_not_upload_boxes():
    """The page makes a component that some event reads an upload box unless it is told
    otherwise: a tab's result that a later step reads (the encode tab's token file, read to
    draw the codes) must say it is not interactive, or the result looks like a place to drop a file."""
    from ui.app import build_ui
    from workers.models import ModelCache
    from workers.settings import Settings

    config = build_ui(ModelCache(Settings())).get_config_file()
    props = {c["id"]: c["props"] for c in config["components"]}
    read = {i for dep in config["dependencies"] for i in dep["inputs"]}
    actions = ("encode", "decode", "dialogue", "transcribe", "tts")
    results = {o for dep in config["dependencies"] if dep["api_name"] in actions for o in dep["outputs"]}
    assert results & read  # the encode tab's token file, at least
    assert [props[o].get("label") for o in results & read if props[o].get("interactive") is not False] == []


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


def test_the_codec_uses_a_local_model_folders_own_mimi_unless_one_is_named(tmp_path, monkeypatch):
    import app
    from moshi_core.loading.hub import DEFAULT_MIMI_SOURCE, MIMI_FILENAMES
    from workers.settings import Settings

    folder, bare = tmp_path / "my-moshi", tmp_path / "no-mimi"
    folder.mkdir(), bare.mkdir()
    (folder / MIMI_FILENAMES[1]).write_bytes(b"")
    own = str(folder / MIMI_FILENAMES[1])
    for name in ("MOSHI_MIMI", "MOSHI_MODEL"):
        monkeypatch.delenv(name, raising=False)

    def mimi(*argv: str, **environ: str) -> str:
        for name, value in environ.items():
            monkeypatch.setenv(name, value)
        env = Settings.from_env()
        return app.serving_settings(env, app.build_parser(env).parse_args(argv)).mimi

    assert mimi("--model", str(folder)) == own
    assert mimi("--model", str(bare)) == DEFAULT_MIMI_SOURCE
    assert mimi("--model", "kyutai/moshiko-pytorch-bf16") == DEFAULT_MIMI_SOURCE
    assert mimi("--model", str(folder), "--mimi", "kyutai/another-mimi") == "kyutai/another-mimi"
    assert mimi("--model", str(bare), MOSHI_MODEL=str(folder)) == DEFAULT_MIMI_SOURCE  # --model's folder decides
    assert mimi("--model", str(folder), MOSHI_MIMI="kyutai/named-mimi") == "kyutai/named-mimi"
    # The API and the workers (no flags) follow the same rule from MOSHI_MODEL.
    assert Settings.from_env({"MOSHI_MODEL": str(folder)}).mimi == own
    named = Settings.from_env({"MOSHI_MODEL": str(folder), "MOSHI_MIMI": "kyutai/named-mimi"})
    assert named.mimi == "kyutai/named-mimi"
