"""The kernels' build folder is keyed on everything the binary depends on, so environments
that alternate never rebuild over each other (no compiler runs here: the build is faked)."""

import sys
import types
from pathlib import Path

import pytest

from moshi_core.cli.main import main
from moshi_core.kernels import build as cpu_kernels


@pytest.fixture
def fake_build(tmp_path, monkeypatch):
    """Builds recorded, not compiled: each writes the module file into the folder it is given."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "supported", lambda: True)
    builds: list[Path] = []

    def load_inline(name, build_directory, **kwargs):
        folder = Path(build_directory)
        kwargs["extra_ldflags"].append("-ltorch")  # as PyTorch does to the lists it is given
        if not (folder / f"{name}.so").exists():  # what PyTorch's JIT does: build once per folder
            builds.append(folder)
            (folder / f"{name}.so").write_text(str(kwargs["extra_cflags"]))
        return types.SimpleNamespace(q8_int8_instructions=lambda: "avx2")  # what build-kernels reports

    monkeypatch.setattr(cpp_extension, "load_inline", load_inline)
    cpu_kernels.kernels.cache_clear()
    yield builds
    cpu_kernels.kernels.cache_clear()


def _load_in(monkeypatch, prefix: str) -> Path:
    """Load the kernels as a process of the virtualenv at `prefix` would."""
    monkeypatch.setattr(sys, "prefix", prefix)
    cpu_kernels.kernels.cache_clear()
    assert cpu_kernels.kernels() is not None
    return cpu_kernels.build_directory()


def test_two_environments_alternating_never_rebuild(fake_build, monkeypatch):
    first = _load_in(monkeypatch, "/venvs/a")
    second = _load_in(monkeypatch, "/venvs/b")
    assert first != second and fake_build == [first, second]
    module = first / f"{cpu_kernels.NAME}.so"
    before = module.stat().st_mtime_ns
    for _ in range(3):
        assert _load_in(monkeypatch, "/venvs/a") == first
        assert _load_in(monkeypatch, "/venvs/b") == second
    assert fake_build == [first, second]  # no rebuild
    assert module.stat().st_mtime_ns == before  # A's build untouched by B's


@pytest.mark.parametrize("change", ["source", "flags", "torch include path", "compiler"])
def test_what_changes_the_binary_changes_the_folder(change, fake_build, monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    unchanged = cpu_kernels.build_directory()
    assert cpu_kernels.build_directory() == unchanged
    if change == "source":
        csrc = tmp_path / "csrc"
        csrc.mkdir()
        for name in cpu_kernels.SOURCES:
            (csrc / name).write_text((cpu_kernels.CSRC / name).read_text())
        monkeypatch.setattr(cpu_kernels, "CSRC", csrc)
        assert cpu_kernels.build_directory() == unchanged  # the same text, wherever it lies
        (csrc / "linear.cpp").write_text((csrc / "linear.cpp").read_text() + "\n// edited\n")
    elif change == "flags":
        monkeypatch.setattr(cpu_kernels, "CFLAGS", [*cpu_kernels.CFLAGS, "-DEXTRA"])
    elif change == "torch include path":
        paths = cpp_extension.include_paths()
        monkeypatch.setattr(cpp_extension, "include_paths", lambda *a, **k: ["/other/venv/torch/include", *paths[1:]])
    else:
        compiler = tmp_path / "g++"
        compiler.write_text("#!/bin/sh\n")
        monkeypatch.setenv("CXX", str(compiler))  # what PyTorch's build runs
    assert cpu_kernels.build_directory() != unchanged


def test_build_kernels_says_what_it_does(fake_build, capsys):
    assert main(["build-kernels"]) == 0
    first = capsys.readouterr()
    folder = cpu_kernels.build_directory()
    assert "building CPU kernels (about a minute, once per environment) into " + str(folder) in first.err
    assert first.out.startswith(f"CPU kernels: ready, built in {folder}")
    cpu_kernels.kernels.cache_clear()
    assert main(["build-kernels"]) == 0
    again = capsys.readouterr()
    assert again.err == "" and again.out.startswith(f"CPU kernels: ready, already built in {folder}")
    assert fake_build == [folder]
