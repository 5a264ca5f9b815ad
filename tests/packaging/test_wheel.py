"""The project as users install it: the wheel `pip` builds from this tree (the Dockerfile's and a
Space's install), installed on its own, away from the checkout, and the CPU kernels built from it."""

import os
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
from commands import run_checked

from moshi_core.kernels import build as cpu_kernels

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("moshi_core", "api", "workers", "ui")
# Every file of these folders goes into the wheel, not only Python: the kernels are compiled
# from them on the user's machine, the browser client is served from them.
DATA_FOLDERS = ("moshi_core/kernels/csrc", "api/static")
# What a checkout gathers beside the sources (see .gitignore), none of it part of a build.
NOT_SOURCES = {".venv", ".git", ".cache", ".pytest_cache", ".ruff_cache", "build", "dist", "data",
               "tests/artifacts", "bench/results"}


def _copy_sources(target: Path) -> None:
    """The tree as it is now (uncommitted files too), without what a checkout gathers beside it."""
    def ignore(folder: str, names: list[str]) -> set[str]:
        here = Path(folder).relative_to(REPO)
        return {n for n in names
                if (here / n).as_posix() in NOT_SOURCES or n == "__pycache__" or n.endswith(".egg-info")}

    shutil.copytree(REPO, target, ignore=ignore)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # pip builds in the source folder (build/, *.egg-info): a copy keeps the shared tree clean and
    # a stale build/lib from hiding a file the package data misses.
    scratch = tmp_path_factory.mktemp("wheel")
    _copy_sources(scratch / "src")
    # Offline: setuptools comes from this environment, the dependencies are not fetched.
    run_checked([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "--disable-pip-version-check", "-q", "-w", str(scratch / "dist"), str(scratch / "src")])
    (built,) = (scratch / "dist").glob("moshi_core-*.whl")
    return built


@pytest.fixture(scope="module")
def site(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel installed alone in a folder of its own (its dependencies come from this environment)."""
    target = tmp_path_factory.mktemp("installed") / "site"
    run_checked([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check",
          "-q", "--target", str(target), str(wheel)])
    return target


def _installed_env(site: Path, extensions: Path) -> dict[str, str]:
    # PYTHONPATH names the installed copy alone; run from elsewhere, the checkout is not on the path.
    # MOSHI_CPU_KERNELS=1: a 0 in the caller's environment would turn the kernels off.
    return {**os.environ, "PYTHONPATH": str(site), "TORCH_EXTENSIONS_DIR": str(extensions),
            "MOSHI_CPU_KERNELS": "1"}


def test_wheel_holds_every_source_file(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f for folder in DATA_FOLDERS for f in (REPO / folder).rglob("*") if f.is_file()}
    expected |= {f for package in PACKAGES if (REPO / package).is_dir() for f in (REPO / package).rglob("*.py")}
    missing = sorted(p for p in (f.relative_to(REPO).as_posix() for f in expected)
                     if "__pycache__" not in p and p not in names)
    assert not missing, f"the wheel leaves out {missing}: see package data and discovery in pyproject.toml"
    assert set(cpu_kernels.SOURCES) <= {Path(n).name for n in names if n.startswith("moshi_core/kernels/csrc/")}


def test_docker_image_builds_the_same_wheel(wheel: Path):
    # The image builds its wheel from what it COPYs: a package missing there is missing for it.
    packages = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist() if "/" in n}
    copied = {line.split()[1] for line in (REPO / "Dockerfile").read_text().splitlines() if line.startswith("COPY ")}
    missing = sorted(p for p in packages if not p.endswith(".dist-info") and p not in copied)
    assert not missing, f"the Dockerfile does not COPY {missing} into its wheel build"


def test_installed_wheel_runs_from_its_own_files(site: Path, tmp_path: Path):
    probe = """
import importlib.metadata, sys
from pathlib import Path
import moshi_core
from moshi_core.kernels import build
site = Path(sys.argv[1])
assert Path(moshi_core.__file__).is_relative_to(site), f"moshi_core imported from {moshi_core.__file__}"
dist = importlib.metadata.distribution("moshi-core")
assert Path(dist.locate_file("")).is_relative_to(site), f"metadata of {dist.locate_file('')}"
main = dist.entry_points["moshi-core"].load()
assert Path(sys.modules[main.__module__].__file__).is_relative_to(site), main.__module__
missing = [name for name in build.SOURCES if not (build.CSRC / name).is_file()]
assert not missing, f"kernel sources missing from {build.CSRC}: {missing}"
"""
    run_checked([sys.executable, "-c", probe, str(site)], cwd=tmp_path, env=_installed_env(site, tmp_path / "ext"))
    assert (site / "bin" / "moshi-core").is_file(), "no moshi-core console script installed"


def test_kernels_build_from_the_installed_wheel(site: Path, tmp_path: Path):
    if not cpu_kernels.supported():
        pytest.skip("this CPU has no AVX2/FMA/F16C: the kernels are not built here")
    extensions = tmp_path / "ext"  # a fresh cache: the build runs on the installed sources
    env = _installed_env(site, extensions)
    # The console script the wheel installs, as a user runs it (one build, about a minute on 2 cores).
    built = run_checked([str(site / "bin" / "moshi-core"), "build-kernels"], cwd=tmp_path, env=env, timeout=900)
    assert "CPU kernels: ready" in built.stdout, f"{built.stdout}\n{built.stderr}"
    probe = """
import sys
from pathlib import Path
import torch
import torch.nn.functional as F
from moshi_core.kernels import build
from moshi_core.kernels.linear import linear, skinny_kernel
assert build.build_directory().is_relative_to(Path(sys.argv[1])), build.build_directory()
assert build.kernels() is not None, "the installed kernels did not load"
g = torch.Generator().manual_seed(0)
x, w, b = torch.randn(3, 64, generator=g), torch.randn(24, 64, generator=g), torch.randn(24, generator=g)
assert skinny_kernel(x, 3) is not None, "linear() would not take the skinny kernel"
torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b))
"""
    run_checked([sys.executable, "-c", probe, str(extensions)], cwd=tmp_path, env=env, timeout=300)
