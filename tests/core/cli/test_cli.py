"""`moshi-core encode` / `decode` end to end, as a user runs them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from moshi_core.formats.tokens import load_tokens

REPO_DIR = Path(__file__).resolve().parents[3]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moshi_core", *map(str, args)], check=False, cwd=REPO_DIR,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.e2e  # the installed command
def test_encode_then_decode_round_trip(tmp_path, shared_audio, mimi_checkpoint):
    tokens, wav = tmp_path / "t.safetensors", tmp_path / "out.wav"
    source = shared_audio / "en_question_44k_stereo.wav"
    done = run_cli("encode", source, "-o", tokens, "--mimi", mimi_checkpoint, "-n", "16", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert "encoding: 100%" in done.stderr
    loaded = load_tokens(tokens)
    assert loaded.codes.shape[:2] == (1, 16) and not loaded.batched
    assert loaded.codec == mimi_checkpoint.name
    info = sf.info(str(source))
    assert loaded.num_samples == [round(info.frames * 24000 / info.samplerate)]

    done = run_cli("decode", tokens, "-o", wav, "--mimi", mimi_checkpoint)
    assert done.returncode == 0, done.stderr
    out = sf.info(str(wav))
    assert (out.samplerate, out.channels, out.frames) == (24000, 1, loaded.num_samples[0])


@pytest.mark.e2e  # the installed command
def test_batch_encode_and_decode(tmp_path, shared_audio, mimi_checkpoint):
    tokens = tmp_path / "batch.safetensors"
    files = [shared_audio / "en_short_16k.wav", shared_audio / "en_question_24k.wav"]
    assert run_cli("encode", *files, "-o", tokens, "--mimi", mimi_checkpoint, "-q").returncode == 0
    loaded = load_tokens(tokens)
    assert loaded.batched and loaded.batch_size == 2
    done = run_cli("decode", tokens, "-o", tmp_path / "out.wav", "--mimi", mimi_checkpoint, "-q")
    assert done.returncode == 0, done.stderr
    lengths = [sf.info(str(tmp_path / f"out.{i}.wav")).frames for i in range(2)]
    assert lengths == loaded.num_samples


@pytest.mark.parametrize("args,message", [
    (["encode", "missing.wav", "-o", "x.safetensors"], "does not exist"),
    (["encode", "{audio}", "-o", "x.safetensors", "-n", "0"], "between 1 and 32"),
    (["encode", "{audio}", "-o", "x.safetensors", "--device", "cuda"], "CUDA is not available"),
    (["encode", "{audio}", "-o", "x.safetensors", "--device", "tpu"], "device"),
    (["decode", "{audio}", "-o", "x.wav"], "not a readable safetensors file"),
])
def test_errors_are_one_clear_line(tmp_path, shared_audio, mimi_checkpoint, args, message):
    args = [a.replace("{audio}", str(shared_audio / "en_short_16k.wav")) for a in args]
    done = run_cli(*args, "--mimi", mimi_checkpoint)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_help_explains_every_flag():
    done = run_cli("encode", "--help")
    assert done.returncode == 0
    for flag in ("--num-codebooks", "--mimi", "--revision", "--device", "--max-seconds", "--quiet"):
        assert flag in done.stdout


def test_build_kernels_reports_what_a_step_will_run():
    from moshi_core.kernels import build as cpu_kernels

    done = run_cli("build-kernels")
    assert done.returncode == 0, done.stderr
    expected = "ready" if cpu_kernels.supported() else "not available"
    assert done.stdout.startswith(f"CPU kernels: {expected}"), done.stdout
    if cpu_kernels.supported():
        assert "8-bit weights multiply in int8 (avx" in done.stdout, done.stdout
        strict = run_cli("--strict-q8", "build-kernels")
        assert "8-bit weights multiply with float activations" in strict.stdout, strict.stdout


def test_a_build_lock_left_by_a_killed_process_does_not_hang_the_next():
    """PyTorch's build lock file, left behind by a process killed while holding it, made every
    later load of the kernels wait forever."""
    from moshi_core.kernels import build as cpu_kernels

    if not cpu_kernels.supported():
        pytest.skip("this CPU has no AVX2/FMA/F16C: the kernels are not built here")
    folder = cpu_kernels.build_directory()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lock").touch()
    try:
        done = run_cli("build-kernels")
    finally:
        (folder / "lock").unlink(missing_ok=True)
    assert done.returncode == 0 and done.stdout.startswith("CPU kernels: ready"), done.stdout + done.stderr


def test_models_lists_every_kind_with_its_default(capsys):
    from moshi_core.cli.main import main
    from moshi_core.loading.catalog import DEFAULT_LM_SOURCE, DEFAULT_STT_SOURCE, DEFAULT_TTS_SOURCE

    assert main(["models"]) == 0
    defaults = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.endswith("[default]")]
    assert defaults == [DEFAULT_LM_SOURCE, DEFAULT_STT_SOURCE, DEFAULT_TTS_SOURCE]
