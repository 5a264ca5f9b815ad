"""Assemble the Hugging Face Space repository (Gradio SDK) into a folder, ready to push.

    python space/build.py [--out dist/space]     # what `make space` runs
    python space/build.py --requirements         # rewrite requirements.txt from pyproject.toml

A Gradio Space's builder installs `requirements.txt` before the repository is there, then
copies the repository in and runs `app.py` from it. So the Space holds the app's sources as
they are (no wheel build) and a `requirements.txt` that names every dependency itself: the
project's runtime and `app` dependencies with pyproject's ranges, written from
`pyproject.toml` (`--requirements`), never by hand.

The folder gets: `README.md` (space/README.md: the Space's front matter and its page),
`app.py`, the packages the app imports with their package data (the kernels' C++ sources,
the browser client), `requirements.txt` and `packages.txt` (Debian packages the builder
installs first). Nothing else: no tests, benchmarks, caches or virtualenvs. Only the standard
library is used, so any Python 3.11 runs it.
"""

import argparse
import shutil
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPACE = REPO / "space"
REQUIREMENTS = REPO / "requirements.txt"
PACKAGES = ("moshi_core", "api", "workers", "ui")
# g++ builds the CPU kernels on a CPU Space (a GPU never uses them); ffmpeg encodes the TTS tab's stream.
DEBIAN_PACKAGES = ("g++", "ffmpeg")
TOP_FILES = ("README.md", "app.py", "requirements.txt", "packages.txt")
REQUIREMENTS_HEADER = """\
# Generated from pyproject.toml by `make requirements` (space/build.py --requirements): do not edit.
# Every dependency of the app, named with pyproject's ranges, so it installs without the
# repository (a Hugging Face Space installs this file before it copies the sources in).
# torch: from PyPI, Linux wheels are the CUDA build; an installed torch in the range is kept.
"""


def requirements_text(pyproject: Path = REPO / "pyproject.toml") -> str:
    """requirements.txt as pyproject.toml defines it: the runtime dependencies, then the app extra."""
    project = tomllib.loads(pyproject.read_text())["project"]
    lines = [*project["dependencies"], *project["optional-dependencies"]["app"]]
    return REQUIREMENTS_HEADER + "".join(f"{line}\n" for line in lines)


def package_files() -> list[Path]:
    """The files of the packages, as the wheel takes them: every module plus the package data."""
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    files = {f for package in PACKAGES for f in (REPO / package).rglob("*.py") if "__pycache__" not in f.parts}
    for package, patterns in package_data.items():
        folder = REPO.joinpath(*package.split("."))
        files |= {f for pattern in patterns for f in folder.glob(pattern) if f.is_file()}
    return sorted(files)


def _clear(out: Path) -> None:
    """Empty `out` of an earlier build; a `.git` (a clone of the Space) stays. Anything a build
    does not write means the folder is not ours: refuse rather than delete it."""
    if not out.exists():
        return
    ours = {*TOP_FILES, *PACKAGES, ".git"}
    strangers = sorted(p.name for p in out.iterdir() if p.name not in ours)
    if strangers:
        raise SystemExit(f"space/build.py: error: {out} holds {', '.join(strangers)}, which no Space build "
                         "writes; choose an empty or new folder with --out")
    for entry in out.iterdir():
        if entry.name != ".git":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def assemble(out: Path) -> None:
    if REQUIREMENTS.read_text() != requirements_text():
        raise SystemExit("space/build.py: error: requirements.txt does not match pyproject.toml; "
                         "run `make requirements` and commit it")
    _clear(out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SPACE / "README.md", out / "README.md")
    shutil.copyfile(REPO / "app.py", out / "app.py")
    shutil.copyfile(REQUIREMENTS, out / "requirements.txt")
    (out / "packages.txt").write_text("".join(f"{name}\n" for name in DEBIAN_PACKAGES))
    for source in package_files():
        target = out / source.relative_to(REPO)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="space/build.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "dist" / "space",
                        help="folder to assemble the Space in; emptied first, but for a .git (default: %(default)s)")
    parser.add_argument("--requirements", action="store_true",
                        help=f"only rewrite {REQUIREMENTS.name} from pyproject.toml")
    args = parser.parse_args(argv)
    if args.requirements:
        REQUIREMENTS.write_text(requirements_text())
        print(f"wrote {REQUIREMENTS}")
        return
    assemble(args.out)
    print(f"Space assembled in {args.out}: push it to a Gradio Space (docs/deployment.md)")


if __name__ == "__main__":
    main()
