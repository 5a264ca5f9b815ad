"""One measurement in a process of its own, so that memory and caches start clean and one
model's weights never share the machine with another's."""

import json
import subprocess
import sys
from pathlib import Path


def run_child(script: Path, *args: str) -> dict:
    """Run `script` with `args`; the JSON object its last line of output prints."""
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
