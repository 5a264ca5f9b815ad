"""One Settings for the app, the API and the workers: checked at start, documented from one table."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from servers import REPO_DIR

from workers.errors import SettingsError
from workers.settings import VARIABLES, Settings, render_table


@pytest.mark.parametrize("name, value, allowed", [
    ("MOSHI_DTYPE", "float8", "bfloat16, float16, float32"),
    ("MOSHI_DEVICE", "gpu", "auto, cpu, cuda or cuda:N"),
    ("MOSHI_DIALOGUE_SLOTS", "zero", "an integer >= 1"),
    ("MOSHI_CPU_KERNELS", "maybe", "1 (on) or 0 (off)"),
    ("MOSHI_LIVE_SLOTS", "-1", "an integer >= 0"),
    ("MOSHI_MAX_UPLOAD_MB", "0", "a number > 0"),
    ("PORT", "x", "an integer from 1 to 65535"),
])
def test_a_bad_value_is_one_line_naming_the_variable_the_value_and_what_is_allowed(name, value, allowed):
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({name: value})
    assert str(caught.value) == f"{name}={value!r} is not valid: use {allowed}"


def test_the_variables_make_the_fields(tmp_path):
    settings = Settings.from_env({
        "MOSHI_MODEL": "a", "MOSHI_MODELS": "b, a,c", "MOSHI_MAX_UPLOAD_MB": "2", "MOSHI_JOB_TTL_HOURS": "0.5",
        "NO_CUDA_GRAPH": "1", "MOSHI_CPU_KERNELS": "0", "GRADIO_SERVER_NAME": "0.0.0.0",
        "PORT": "9000", "MOSHI_API_KEYS": "k1,,k2", "MOSHI_STORAGE_DIR": str(tmp_path), "MOSHI_DTYPE": " ",
    })
    assert settings.models == ("a", "b", "c") and settings.default_model == "a"
    assert settings.max_upload_bytes == 2 * 2**20 and settings.job_ttl_seconds == 1800
    assert settings.gpu_step == "compile" and not settings.cpu_kernels
    assert (settings.host, settings.port) == ("0.0.0.0", 9000)
    assert settings.api_keys == {"k1", "k2"} and settings.storage_dir == tmp_path
    assert settings.dtype == "bfloat16"  # blank is unset
    # Kyutai's switches: CUDA graphs unless told otherwise; no compile wins over no graphs.
    assert Settings.from_env({}).gpu_step == "cuda-graphs"
    assert Settings.from_env({"NO_TORCH_COMPILE": "1", "NO_CUDA_GRAPH": "1"}).gpu_step == "eager"
    assert Settings.from_env({"MOSHI_GPU_Q8": "dequantize"}).gpu_q8 == "dequantize"
    assert Settings.from_env({"HOST": "h", "GRADIO_SERVER_NAME": "g"}).host == "h"
    # A Hugging Face Space preloads what its live tab needs, unless told otherwise.
    assert Settings.from_env({"SPACE_ID": "me/moshi"}).preload == ("moshi", "mimi")
    assert Settings.from_env({"SPACE_ID": "me/moshi", "MOSHI_PRELOAD": "none"}).preload == ()


def test_the_documented_defaults_are_the_defaults(monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert Settings.from_env({}) == Settings()
    for var in VARIABLES:
        if var.default:
            assert Settings.from_env({var.name: var.default}) == Settings(), var.name
    assert {var.field for var in VARIABLES} == {f.name for f in dataclasses.fields(Settings)}


def test_every_gpu_step_the_core_runs_can_be_set():
    from moshi_core.params import GPU_STEPS

    steps = {Settings.from_env(env).gpu_step for env in ({}, {"NO_CUDA_GRAPH": "1"}, {"NO_TORCH_COMPILE": "1"})}
    assert steps == set(GPU_STEPS)


def test_the_docs_table_is_the_rendered_one():
    text = (REPO_DIR / "docs" / "configuration.md").read_text()
    table = render_table()
    assert table in text, "docs/configuration.md is out of date: paste workers.settings.render_table() into it"
    assert sum(line.startswith("|") for line in text.splitlines()) == table.count("\n")


@pytest.mark.parametrize("command", [[sys.executable, "-m", "api"],
                                     [str(Path(sys.executable).with_name("celery")), "-A", "workers", "worker"]],
                         ids=["api", "celery"])
def test_the_servers_stop_at_start_on_a_bad_variable(tmp_path: Path, command: list[str]):
    env = {**os.environ, "MOSHI_DTYPE": "float8", "MOSHI_STORAGE_DIR": str(tmp_path), "PYTHONPATH": str(REPO_DIR)}
    done = subprocess.run(command, check=False, cwd=REPO_DIR, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip() == "MOSHI_DTYPE='float8' is not valid: use bfloat16, float16, float32"
