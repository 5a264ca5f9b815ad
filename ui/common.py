"""What every tab shares: the one mapping of core errors to Gradio's, progress, output files."""

import functools
import inspect
import tempfile
from collections.abc import Callable
from pathlib import Path

import gradio as gr

from moshi_core.errors import MoshiError
from moshi_core.loading.progress import DOWNLOADING, LoadStatus
from moshi_core.models.mimi import Progress
from workers.models import ModelCache


def shows_errors(fn: Callable) -> Callable:
    """`fn` as a Gradio handler whose `MoshiError`s reach the page as their one-line message.

    A generator stays a generator (Gradio streams it), and `functools.wraps` keeps the
    signature Gradio reads its `gr.Progress` argument from.
    """
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def streaming(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except MoshiError as exc:
                raise gr.Error(str(exc)) from exc
        return streaming

    @functools.wraps(fn)
    def handler(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MoshiError as exc:
            raise gr.Error(str(exc)) from exc
    return handler


# Only a marker: Gradio finds a handler's progress argument by this default and passes each
# call a tracker of its own.
PROGRESS = gr.Progress()


def progress_callback(progress: gr.Progress, label: str) -> Progress:
    return lambda done, total: progress(done / max(total, 1), desc=f"{label} {done}/{total} frames")


def load_shown(models: ModelCache, progress: gr.Progress):
    """Inside, the load of a model the handler waits for shows on its progress bar: the stage,
    and a download's bytes, rate and time left."""
    def show(status: LoadStatus) -> None:
        fraction = status.done / status.total if status.stage == DOWNLOADING and status.total else None
        progress(fraction, desc=status.describe())
    return models.watching(show)


def out_path(stem: str, suffix: str) -> Path:
    """A fresh file for Gradio to serve (it hands out files from the temp folder)."""
    return Path(tempfile.mkdtemp(prefix="moshi-")) / f"{stem}{suffix}"


def download_file(label: str) -> gr.File:
    """An output file the page offers to download, never an upload box (Gradio makes any
    component that is also some event's input an upload box unless told otherwise)."""
    return gr.File(label=label, interactive=False)


SEED_LABEL = "Seed (-1: a new one each time)"


def seed_field() -> gr.Number:
    return gr.Number(value=-1, precision=0, label=SEED_LABEL)


def seed_value(seed: float | None) -> int | None:
    """The seed field's value as a generator seed: negative or blank draws a new one."""
    return None if seed is None or seed < 0 else int(seed)


def seed_shown(seed: int) -> str:
    """The seed an answer was sampled with, as the page shows it beside the answer."""
    return f"seed: {seed}"
