"""compose.yaml: valid for Docker Compose (its own `config` check against the Compose
specification), and right for this project: every command runs in our image, every variable
is one our settings know, GPUs are reserved, jobs reach the workers, health is checked."""

import importlib
import importlib.util
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from celery import Celery
from commands import run_checked
from packaging.requirements import Requirement

from workers.jobs import QUEUE_OF
from workers.settings import VARIABLES, Settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "compose.yaml"
# Variables of other programs the services set: huggingface_hub's token.
FOREIGN_VARIABLES = {"HF_TOKEN"}


def _compose_command() -> list[str]:
    """Docker's compose plugin where it works, else Debian's docker-compose (v1), which
    `make test` installs; both validate a file with `config` without a Docker engine."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("neither `docker compose` nor `docker-compose` is installed: run `make test`, which installs it")


def _services() -> dict[str, dict]:
    """The services as Compose runs them with no variable set: `${NAME:-default}` is its default."""
    text = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", COMPOSE.read_text()).replace("$$", "$")
    return yaml.safe_load(text)["services"]


def _ours() -> dict[str, dict]:
    return {name: s for name, s in _services().items() if s.get("build") == "."}


def _dockerfile_env() -> dict[str, str]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    (env,) = [line for line in text.splitlines() if line.startswith("ENV ")]
    return dict(pair.split("=", 1) for pair in env.split()[1:])


def test_compose_validates_the_file():
    # No variables from the caller's environment: the file must hold with its own defaults.
    run_checked([*_compose_command(), "-f", str(COMPOSE), "config", "-q"], cwd=REPO,
                env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp"})


def test_validation_catches_a_misspelt_option(tmp_path: Path):
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("healthcheck:", "healthchek:", 1))
    done = subprocess.run([*_compose_command(), "-f", str(broken), "config", "-q"], capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode != 0 and "healthchek" in done.stderr + done.stdout


def _check_command(command: list[str]) -> None:
    """The command exists in our image and takes these arguments."""
    copied = {line.split()[1] for line in (REPO / "Dockerfile").read_text().splitlines() if line.startswith("COPY ")}
    if command[:2] == ["python", "app.py"]:
        assert "app.py" in copied, "the Dockerfile does not COPY app.py"
        spec = importlib.util.spec_from_file_location("app_main", REPO / "app.py")
        app = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(app)
        app.build_parser(Settings()).parse_args(command[2:])  # a bad flag exits here
    elif command[0] == "celery":
        app_extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["app"]
        assert "celery" in {Requirement(r).name for r in app_extra}, "celery is not an app dependency"
        assert command[1:4] == ["-A", "workers", "worker"], command
        assert isinstance(importlib.import_module("workers").app, Celery), "`celery -A workers` finds no app"
        assert set(command[command.index("-Q") + 1].split(",")) <= set(QUEUE_OF.values()), command
        int(command[command.index("-c") + 1])  # the concurrency: a number
    else:
        pytest.fail(f"no check for the command {command}: teach this test what it runs")


def test_every_service_runs_a_command_of_our_image():
    ours = _ours()
    assert {"app", "worker-gpu0"} <= set(ours), "the stack is the app and its GPU worker (plus Redis)"
    for name, service in ours.items():
        _check_command([str(part) for part in service["command"]])


def test_environment_is_what_our_settings_read():
    known = {var.name for var in VARIABLES} | FOREIGN_VARIABLES
    for name, service in _ours().items():
        env = {key: str(value) for key, value in service["environment"].items()}
        assert set(env) <= known, f"{name} sets {sorted(set(env) - known)}, which nothing reads"
        Settings.from_env({**_dockerfile_env(), **env})  # every value parses


def test_jobs_go_through_redis_to_workers_for_every_queue():
    services = _services()
    ours = _ours()
    urls = {service["environment"]["REDIS_URL"] for service in ours.values()}
    assert len(urls) == 1, f"the app and the workers must share one queue: {urls}"
    assert re.match(r"redis://redis:6379/", urls.pop()) and "redis" in services
    consumed = {queue for service in ours.values() if service["command"][0] == "celery"
                for queue in service["command"][service["command"].index("-Q") + 1].split(",")}
    assert consumed == set(QUEUE_OF.values()), f"queues nobody works on: {set(QUEUE_OF.values()) - consumed}"
    # Uploads and results are files: the app and the workers mount the same folders.
    image = _dockerfile_env()
    for name, service in ours.items():
        targets = {volume.split(":")[1] for volume in service["volumes"]}
        assert {image["MOSHI_STORAGE_DIR"], image["HF_HOME"]} <= targets, name


def test_gpu_services_reserve_a_gpu_and_cpu_workers_none():
    for name, service in _ours().items():
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        if service["environment"].get("MOSHI_DEVICE") == "cuda":
            assert any("gpu" in d["capabilities"] for d in devices), f"{name} runs on CUDA without a GPU"
        else:
            assert service["environment"].get("MOSHI_DEVICE") == "cpu" and not devices, name


def test_every_service_has_a_health_check():
    services = _services()
    app = services["app"]
    port = app["command"][app["command"].index("--port") + 1]
    assert f"{port}:{port}" in app["ports"]
    assert f"127.0.0.1:{port}/healthz" in " ".join(app["healthcheck"]["test"])
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
        if service["command"][0] == "celery":  # a worker answers Celery's ping under its own name
            node = service["command"][service["command"].index("-n") + 1].replace("%h", "$HOSTNAME")
            assert f"inspect ping -d {node}" in service["healthcheck"]["test"][1], name
