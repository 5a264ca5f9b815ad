"""`moshi-core tts` as a user runs it: text from an argument, a file or stdin; errors exit 2."""

import argparse
import json
import subprocess
import sys

import pytest
import soundfile as sf
from servers import REPO_DIR
from tts_oracle import VOICES, tiny_tts  # noqa: F401 (fixture)


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moshi_core", "tts", *args], input=stdin, text=True, check=False,
                          capture_output=True, cwd=REPO_DIR, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


@pytest.mark.e2e  # the installed command
def test_tts_cli_from_stdin_and_errors(tiny_tts, tmp_path):  # noqa: F811
    folder, voices = tiny_tts
    common = ["--model", str(folder), "--voices", str(voices), "--dtype", "float32", "--seed", "3"]
    done = _run("-", "-o", str(tmp_path / "a.wav"), "--words", str(tmp_path / "a.json"), "--voice", VOICES[1],
                *common, stdin="hello\nyou\n")
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stderr and "s of speech generated" in done.stderr
    audio, rate = sf.read(tmp_path / "a.wav")
    words = json.loads((tmp_path / "a.json").read_text())
    assert rate == 24000 and audio.shape[0] > 12000
    assert words["text"] == "hello you" and [w["text"] for w in words["words"]] == ["hello", "you"]

    # Bad input fails with one line and exit code 2, before the model loads.
    for args, message in ((["-o", "x.wav"], "no text"),
                          (["hi", "-o", "x.wav", "--voice", "nobody"], "unknown voice 'nobody'")):
        done = _run(*args, *common)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("moshi-core tts: error:") and message in lines[0], done.stderr


def test_tts_text_from_a_file_or_argument(tmp_path):
    from moshi_core.cli.tts import read_text
    from moshi_core.errors import InvalidParameterError

    (tmp_path / "in.txt").write_text("  hello\n how are you  \n")
    assert read_text(argparse.Namespace(text=None, text_file=str(tmp_path / "in.txt"))) == "hello how are you"
    assert read_text(argparse.Namespace(text="a  b", text_file=None)) == "a b"
    for ns, message in ((argparse.Namespace(text="x", text_file="f"), "not both"),
                        (argparse.Namespace(text=None, text_file=str(tmp_path / "none.txt")), "cannot read"),
                        (argparse.Namespace(text=" ", text_file=None), "empty")):
        with pytest.raises(InvalidParameterError, match=message):
            read_text(ns)
