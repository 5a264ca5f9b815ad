"""The Hugging Face Space: what `make space` assembles, and that it installs and runs in the
builder's order: `pip install -r requirements.txt` with nothing else present, then the
repository copied in, then `python app.py`."""

import importlib.util
import shutil
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import pytest
import yaml
from app_server import serve_app
from commands import run_checked
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from moshi_core.kernels import build as cpu_kernels

REPO = Path(__file__).resolve().parents[2]
WHEELHOUSE = REPO / ".cache" / "space-wheels"  # what `pip download -r requirements.txt` fetched (see below)
_spec = importlib.util.spec_from_file_location("space_build", REPO / "space" / "build.py")
space_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(space_build)


def _assemble(out: Path) -> Path:
    run_checked([sys.executable, str(REPO / "space" / "build.py"), "--out", str(out)])
    return out


def _front_matter(readme: Path) -> dict:
    _, header, _ = readme.read_text().split("---\n", 2)
    return yaml.safe_load(header)


def test_requirements_are_pyprojects_dependencies():
    # The Space installs requirements.txt alone: a dependency added to pyproject.toml only would be missing there.
    assert (REPO / "requirements.txt").read_text() == space_build.requirements_text(), \
        "requirements.txt differs from pyproject.toml: run `make requirements`"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    listed = [Requirement(line) for line in (REPO / "requirements.txt").read_text().splitlines()
              if line and not line.startswith("#")]
    assert [str(r) for r in listed] == [str(Requirement(d)) for d in
                                        project["dependencies"] + project["optional-dependencies"]["app"]]


def test_space_holds_the_app_and_nothing_else(tmp_path: Path):
    space = _assemble(tmp_path / "space")
    assert {p.name for p in space.iterdir()} == {*space_build.TOP_FILES, *space_build.PACKAGES}
    files = {p.relative_to(space).as_posix() for p in space.rglob("*") if p.is_file()}
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]
    # The app's own files, and what it serves or compiles at run time.
    for needed in ("app.py", "ui/app.py", "api/static/live.js", "workers/celery_app.py",
                   *(f"moshi_core/kernels/csrc/{name}" for name in cpu_kernels.SOURCES)):
        assert needed in files, f"the Space lacks {needed}"
    sources = {p.relative_to(REPO).as_posix() for package in space_build.PACKAGES
               for p in (REPO / package).rglob("*.py") if "__pycache__" not in p.parts}
    assert sources <= files, f"modules missing from the Space: {sorted(sources - files)}"


def test_front_matter_fits_the_project(tmp_path: Path):
    space = _assemble(tmp_path / "space")
    config = _front_matter(space / "README.md")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert config["sdk"] == "gradio" and (space / config["app_file"]).is_file()
    # The builder installs gradio==sdk_version after requirements.txt: it must be inside our range.
    (gradio,) = [Requirement(r) for r in project["optional-dependencies"]["app"] if r.startswith("gradio")]
    assert gradio.specifier.contains(config["sdk_version"]), (config["sdk_version"], str(gradio))
    assert SpecifierSet(project["requires-python"]).contains(f"{config['python_version']}.0")


def test_build_refuses_a_folder_it_did_not_write(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("mine")
    done = subprocess.run([sys.executable, str(REPO / "space" / "build.py"), "--out", str(tmp_path)], check=False,
                          capture_output=True, text=True)
    assert done.returncode != 0 and "notes.txt" in done.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_space_installs_alone_then_serves_its_page(tmp_path: Path, mimi_checkpoint: Path, tiny_moshi: Path):
    space = _assemble(tmp_path / "space")
    # The builder's order: a fresh virtualenv, requirements.txt installed in a folder that holds
    # nothing else, and only then the Space's files.
    build = tmp_path / "build"
    build.mkdir()
    shutil.copyfile(space / "requirements.txt", build / "requirements.txt")
    venv = tmp_path / "venv"
    run_checked([sys.executable, "-m", "venv", str(venv)], cwd=build)
    python = str(venv / "bin" / "python")
    _install_requirements_alone(python, build, tmp_path / "torch.txt")
    shutil.copytree(space, build, dirs_exist_ok=True)
    with serve_app(mimi_checkpoint, tiny_moshi, python=python, cwd=build) as url:
        with urllib.request.urlopen(url + "/", timeout=30) as response:
            assert response.status == 200 and "gradio_config" in response.read().decode()
        with urllib.request.urlopen(url + "/healthz", timeout=10) as response:
            assert response.status == 200
    # The app ran from the copied sources: the environment holds no installed moshi-core.
    probe = run_checked([python, "-c", "import importlib.util; print(importlib.util.find_spec('moshi_core'))"],
                        cwd=tmp_path)
    assert probe.stdout.strip() == "None"


def _install_requirements_alone(python: str, folder: Path, constraints: Path) -> None:
    """`pip install -r requirements.txt` in `folder`, which holds that file alone.

    Two shortcuts, neither changing what pip must find from requirements.txt alone: torch is
    held to this machine's version, which lies on its disk (a Space gets PyPI's CUDA build of
    the same range), and the files come from a wheelhouse that `pip download` of the same file
    fills (downloads take minutes here, and are done again only when the file asks for
    something the wheelhouse lacks). --no-compile: no bytecode for thousands of modules."""
    import torch

    constraints.write_text(f"torch=={torch.__version__.split('+')[0]}\n")
    pip = [python, "-m", "pip", "--disable-pip-version-check"]
    offline = [*pip, "install", "-q", "--no-compile", "--no-index", "--find-links", str(WHEELHOUSE),
               "-r", "requirements.txt", "-c", str(constraints)]
    if subprocess.run(offline, cwd=folder, capture_output=True).returncode != 0:
        run_checked([*pip, "download", "-q", "-r", "requirements.txt", "-c", str(constraints), "-d", str(WHEELHOUSE)],
                    cwd=folder, timeout=1200)
        run_checked(offline, cwd=folder, timeout=1200)
