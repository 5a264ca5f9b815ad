"""A tab that waits for a model shows the model's load on its Gradio progress bar."""

import workers.models
from moshi_core.loading.progress import report_download
from ui.common import load_shown
from workers.models import ModelCache
from workers.settings import Settings


class Bar:
    """Records what a handler's `gr.Progress` is told."""

    def __init__(self) -> None:
        self.calls: list[tuple[float | None, str]] = []

    def __call__(self, fraction, desc: str) -> None:
        self.calls.append((fraction, desc))


def test_the_progress_bar_shows_the_stage_and_the_download(tmp_path, monkeypatch):
    def load_mimi(*args, **kwargs):
        report_download("mimi.safetensors", 250, 1000)
        return "a mimi"

    monkeypatch.setattr(workers.models, "load_mimi", load_mimi)
    models, bar = ModelCache(Settings(storage_dir=tmp_path, cpu_kernels=False, device="cpu")), Bar()
    with load_shown(models, bar):
        assert models.mimi() == "a mimi"
    assert bar.calls[0] == (None, "mimi: loading weights")
    assert bar.calls[1] == (0.25, "mimi: downloading mimi.safetensors 250 B of 1.0 kB")
    assert bar.calls[-1] == (None, "mimi: ready")
    with load_shown(models, bar):
        models.mimi()  # loaded: nothing more to show
    assert len(bar.calls) == 3
