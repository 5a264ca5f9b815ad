"""Commands the packaging tests run (pip, the built app, linters): their output shown when they fail."""

import subprocess


def run_checked(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    """`command` run to its end (text output captured); a non-zero exit fails the test with its output."""
    done = subprocess.run(command, check=False, capture_output=True, text=True, **kwargs)
    what = "a probe script" if "-c" in command else " ".join(command)
    assert done.returncode == 0, f"{what} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done
