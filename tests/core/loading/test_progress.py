"""The load-progress record: stages, download rate and time left, observers, the load a report belongs to."""

import pytest

from moshi_core.loading.progress import (
    BUILDING_KERNELS,
    DOWNLOADING,
    FAILED,
    LOADING_WEIGHTS,
    READY,
    LoadProgress,
    report_download,
    report_stage,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_load_goes_through_its_stages_and_reports_from_inside_reach_it():
    clock = Clock()
    record = LoadProgress(clock)
    seen = []
    record.subscribe(seen.append)
    with record.loading("moshi"):
        report_stage(BUILDING_KERNELS)
        report_download("model.gguf", 0, 8_000_000)
        clock.now += 2
        report_download("model.gguf", 4_000_000, 8_000_000)
        report_stage(LOADING_WEIGHTS)
    assert [s.stage for s in seen] == [LOADING_WEIGHTS, BUILDING_KERNELS, DOWNLOADING, DOWNLOADING,
                                       LOADING_WEIGHTS, READY]
    halfway = seen[3]
    assert (halfway.file, halfway.done, halfway.total) == ("model.gguf", 4_000_000, 8_000_000)
    assert halfway.rate == pytest.approx(2_000_000) and halfway.eta == pytest.approx(2.0)
    assert halfway.describe() == "moshi: downloading model.gguf 4.0 MB of 8.0 MB, 2.0 MB/s, 2 s left"
    assert record.unfinished() == {} and record.snapshot()["moshi"].stage == READY


def test_a_new_file_starts_its_own_rate():
    clock = Clock()
    record = LoadProgress(clock)
    with record.loading("tts"):
        report_download("a", 0, 100)
        clock.now += 10
        report_download("a", 100, 100)
        report_download("b", 0, 1000)
        clock.now += 1
        report_download("b", 500, 1000)
        assert record.snapshot()["tts"].rate == pytest.approx(500)


def test_a_failed_load_keeps_its_error_and_is_unfinished():
    record = LoadProgress()
    with pytest.raises(OSError), record.loading("stt"):
        raise OSError("disk full")
    status = record.unfinished()["stt"]
    assert (status.stage, status.error) == (FAILED, "disk full")
    assert status.describe() == "stt: failed: disk full"


def test_reports_outside_a_load_go_nowhere_and_a_broken_observer_does_not_fail_the_load():
    report_stage(BUILDING_KERNELS)  # no load: nothing to tell, nothing raised
    record = LoadProgress()
    record.subscribe(lambda status: 1 / 0)
    seen = []
    unsubscribe = record.subscribe(seen.append)
    with record.loading("mimi"):
        unsubscribe()
    assert [s.stage for s in seen] == [LOADING_WEIGHTS]
    assert record.snapshot()["mimi"].stage == READY


def test_to_dict_has_the_set_fields_only():
    record = LoadProgress(Clock())
    with record.loading("moshi"):
        report_download("f", 10, None)
        assert record.snapshot()["moshi"].to_dict() == {"model": "moshi", "stage": DOWNLOADING, "started_at": 1000.0,
                                                        "file": "f", "done": 10}
