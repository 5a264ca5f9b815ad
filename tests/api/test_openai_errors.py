"""Errors on the OpenAI routes: OpenAI's shape, and one status for one cause wherever it is found."""

import tempfile

import pytest
from fastapi.testclient import TestClient

from api.app import create_api
from api.errors import STATUS, job_problem, openai_error_body, status_of
from moshi_core.errors import ModelSourceError
from workers.errors import QuotaExceededError, UnknownModelError
from workers.runner import _error_code
from workers.settings import Settings


@pytest.mark.parametrize("cls", [cls for cls, _, _ in STATUS])
def test_a_failed_jobs_error_gets_the_status_the_same_error_gets_at_once(cls):
    # What the worker records (workers.runner), read back by a synchronous endpoint.
    exc = cls("why", retry_after=1) if cls is QuotaExceededError else cls("why")
    problem = job_problem({"code": _error_code(exc), "message": "why"}, "transcription")
    assert (problem.status, problem.code) == status_of(exc)


def test_the_openai_body_names_the_field_and_the_kind_of_error():
    assert openai_error_body(UnknownModelError("unknown model 'x'")) == {"error": {
        "message": "unknown model 'x'", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}
    assert openai_error_body(ModelSourceError("no such repo"))["error"]["type"] == "server_error"


def test_openai_routes_answer_openais_shape_and_ours_keep_ours():
    client = TestClient(create_api(Settings(storage_dir=tempfile.mkdtemp())))
    with client:
        missing = client.post("/v1/audio/speech", json={"model": "tts-1", "voice": "v"})  # no input
        assert missing.status_code == 422
        error = missing.json()["error"]
        assert error["param"] == "input" and error["type"] == "invalid_request_error"
        unknown = client.post("/v1/audio/speech", json={"model": "tts-9", "voice": "v", "input": "hi"})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
        assert client.get("/v1/audio/nothing").json()["error"]["type"] == "invalid_request_error"
        translation = client.post("/v1/audio/translations")
        assert translation.status_code == 404
        assert "use /v1/audio/transcriptions" in translation.json()["error"]["message"]
        ours = client.post("/v1/tts", json={"text": ""})
        assert set(ours.json()["error"]) == {"code", "message"}


def test_the_doors_refusals_take_openais_shape_on_openai_routes():
    """401 (no key) and 413 (too large) come from middleware, before any route runs."""
    settings = Settings(storage_dir=tempfile.mkdtemp(), api_keys=frozenset({"k"}), max_upload_bytes=2**20)
    with TestClient(create_api(settings)) as client:
        no_key = client.get("/v1/models")
        assert no_key.status_code == 401 and no_key.json()["error"]["type"] == "authentication_error"
        assert set(client.get("/v1/jobs").json()["error"]) == {"code", "message"}
        big = client.post("/v1/audio/transcriptions", content=b"x" * (2 << 20), headers={"Authorization": "Bearer k"})
        assert big.status_code == 413 and set(big.json()["error"]) == {"message", "type", "param", "code"}
