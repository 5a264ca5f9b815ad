"""One key guards every door, and no server file crosses the Gradio boundary.

The attacks run against `python app.py` (embedded queue, tiny checkpoints) with two API keys
and a metrics key; the middleware's own rules are checked in-process first.
"""

import json
import shutil
import time

import httpx
import pytest
import websockets.sync.client
from app_server import serve_app
from fastapi import FastAPI, Request, WebSocket
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from api.auth import COOKIE, LOGIN_PATH, install_auth
from workers.settings import Settings

KEYS = "keyA,keyB"
METRICS_KEY = "metrics-only"
HEADERS_A = {"Authorization": "Bearer keyA"}


def echo_app(settings: Settings) -> FastAPI:
    """A tiny app behind the guard: it shows the key the guard handed to the route."""
    app = FastAPI()

    @app.get("/whoami")
    def whoami(request: Request) -> dict:
        return {"key": request.state.api_key}

    @app.post("/upload")
    async def upload(request: Request) -> dict:
        return {"size": len(await request.body())}

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    def metrics() -> str:
        return "jobs 0"

    @app.websocket("/api/chat")
    async def chat(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_text(ws.state.api_key)
        await ws.close()

    install_auth(app, settings)
    return app


@pytest.fixture(scope="module")
def guarded() -> TestClient:
    settings = Settings(api_keys=frozenset(KEYS.split(",")), metrics_key=METRICS_KEY)
    return TestClient(echo_app(settings))


@pytest.mark.parametrize("how", [
    {"headers": {"Authorization": "Bearer keyB"}},
    {"headers": {"kyutai-api-key": "keyB"}},
    {"params": {"auth_id": "keyB"}},
    {"params": {"api_key": "keyB"}},
    {"cookies": {COOKIE: "keyB"}},
])
def test_every_way_of_sending_a_key_reaches_the_route(guarded, how):
    client = TestClient(guarded.app, cookies=how.get("cookies"))
    response = client.get("/whoami", headers=how.get("headers"), params=how.get("params"))
    assert response.status_code == 200 and response.json() == {"key": "keyB"}


def test_no_key_or_a_wrong_one_is_401_saying_how_to_send_one(guarded):
    missing = guarded.get("/whoami")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"]["code"] == "unauthorized"
    assert "Authorization: Bearer" in missing.json()["error"]["message"]
    wrong = guarded.get("/whoami", headers={"Authorization": "Bearer keyC"})
    assert wrong.status_code == 401 and "unknown API key" in wrong.json()["error"]["message"]
    assert guarded.get("/healthz").status_code == 200  # load balancers' probes stay open


def test_the_key_is_checked_before_the_body_is_read(guarded):
    read = []

    def body():
        read.append(True)
        yield b"x" * 1024

    assert guarded.post("/upload", content=body()).status_code == 401
    assert not read


def test_a_person_opening_a_page_is_sent_to_the_login_page(guarded):
    page = guarded.get("/whoami", headers={"Accept": "text/html"}, follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"] == LOGIN_PATH
    login = guarded.get(LOGIN_PATH)
    assert login.status_code == 200 and "<form" in login.text and "http" not in login.text.split("<form")[1]


def test_the_login_page_sets_a_strict_http_only_cookie_that_opens_the_doors(guarded):
    client = TestClient(guarded.app)
    refused = client.post(LOGIN_PATH, data={"key": "keyC"}, follow_redirects=False)
    assert refused.status_code == 401 and COOKIE not in refused.cookies
    done = client.post(LOGIN_PATH, data={"key": "keyA"}, follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == "/"
    cookie = done.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert client.get("/whoami").json() == {"key": "keyA"}
    with client.websocket_connect("/api/chat") as ws:  # a browser sends the cookie on the upgrade
        assert ws.receive_text() == "keyA"


def test_another_sites_form_cannot_log_a_visitor_in(guarded):
    client = TestClient(guarded.app)
    forged = client.post(LOGIN_PATH, data={"key": "keyA"}, headers={"Origin": "https://evil.example"},
                          follow_redirects=False)
    assert forged.status_code == 403 and "set-cookie" not in forged.headers
    own = client.post(LOGIN_PATH, data={"key": "keyA"}, headers={"Origin": "http://testserver"},
                      follow_redirects=False)
    assert own.status_code == 303 and COOKIE in own.cookies


def test_a_websocket_without_a_key_is_closed_before_it_is_accepted(guarded):
    with pytest.raises(WebSocketDisconnect) as closed, guarded.websocket_connect("/api/chat") as ws:
        ws.receive_text()
    assert closed.value.code == 1008 and "api_key" in closed.value.reason
    with guarded.websocket_connect("/api/chat?auth_id=keyB") as ws:
        assert ws.receive_text() == "keyB"


def test_metrics_takes_its_own_key_only(guarded):
    assert guarded.get("/metrics").status_code == 401
    assert guarded.get("/metrics", headers=HEADERS_A).status_code == 401
    assert guarded.get("/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"}).status_code == 200
    assert guarded.get("/whoami", headers={"Authorization": f"Bearer {METRICS_KEY}"}).status_code == 401


def test_without_a_metrics_key_metrics_takes_the_api_keys():
    client = TestClient(echo_app(Settings(api_keys=frozenset({"keyA"}))))
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=HEADERS_A).status_code == 200


def test_without_keys_every_door_is_open():
    client = TestClient(echo_app(Settings()))
    assert client.get("/metrics").status_code == 200 and client.post("/upload", content=b"x").status_code == 200
    assert client.get("/whoami").json() == {"key": ""}


# The served app: every door, and the Gradio API's file inputs.


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    return tmp_path_factory.mktemp("storage")


@pytest.fixture(scope="module")
def app_url(mimi_checkpoint, tiny_moshi, storage):
    with serve_app(mimi_checkpoint, tiny_moshi, MOSHI_API_KEYS=KEYS, MOSHI_METRICS_KEY=METRICS_KEY,
                   MOSHI_STORAGE_DIR=str(storage)) as url:
        yield url


def gradio_call(url: str, api: str, data: list, headers: dict[str, str]) -> tuple[str, str]:
    """A call of the Gradio API as any HTTP client makes it: its last event and that event's data."""
    with httpx.Client(base_url=url, timeout=20, headers=headers) as client:
        posted = client.post(f"/gradio_api/call/{api}", json={"data": data})
        if posted.status_code != 200:
            return f"refused {posted.status_code}", posted.text
        events = client.get(f"/gradio_api/call/{api}/{posted.json()['event_id']}").text
    lines = [line for line in events.splitlines() if line.startswith(("event:", "data:"))]
    return lines[-2].removeprefix("event:").strip(), lines[-1].removeprefix("data:").strip()


def server_file(path: str) -> dict:
    return {"path": path, "meta": {"_type": "gradio.FileData"}}


@pytest.mark.e2e
@pytest.mark.parametrize("door", ["/", "/gradio_api/info", "/config", "/v1/jobs", "/api/chat/stats",
                                  "/gradio_api/upload", "/metrics"])
def test_every_door_of_the_served_app_needs_a_key(app_url, door):
    with httpx.Client(base_url=app_url, timeout=20) as client:
        method = client.post if door == "/gradio_api/upload" else client.get
        assert method(door).status_code == 401, door
        assert client.get("/healthz").status_code == 200


@pytest.mark.e2e
def test_the_gradio_api_and_the_live_socket_need_a_key(app_url):
    assert gradio_call(app_url, "decode", [server_file("/etc/hostname")], {})[0] == "refused 401"
    ws_url = app_url.replace("http", "ws", 1) + "/api/chat"
    with pytest.raises(websockets.InvalidStatus) as refused:  # closed before it is accepted
        websockets.sync.client.connect(ws_url, open_timeout=10).close()
    assert refused.value.response.status_code == 403
    with websockets.sync.client.connect(ws_url + "?api_key=keyA&codec=pcm", open_timeout=10) as ws:
        assert ws.recv(timeout=30)[:1] == b"\x00"  # the handshake: the conversation has started


def leaked(url: str, text: str, secret: str) -> bool:
    """Whether the answer names a Gradio cache copy that serves `secret` (the issue's two steps)."""
    with httpx.Client(base_url=url, timeout=10, headers=HEADERS_A) as client:
        for word in json.dumps(text).replace("\\", " ").replace("'", " ").replace('"', " ").split():
            if "/" in word and client.get(f"/gradio_api/file={word}").content.find(secret.encode()) >= 0:
                return True
    return False


@pytest.mark.e2e
def test_a_server_path_as_gradio_input_is_refused_and_never_served(app_url):
    with open("/etc/passwd") as f:
        secret = f.readline().strip()
    event, data = gradio_call(app_url, "encode", [server_file("/etc/passwd"), 8], HEADERS_A)
    assert event == "refused 422" and "not a file uploaded to this server" in data, data
    assert not leaked(app_url, data, secret)


@pytest.mark.e2e
def test_another_keys_job_input_cannot_be_read_through_the_ui(app_url, storage, shared_audio):
    with httpx.Client(base_url=app_url, timeout=30) as client:
        speech = (shared_audio / "en_short_16k.wav").read_bytes()
        job = client.post("/v1/codec/encode", files={"file": ("b.wav", speech)}, headers={"Authorization":
                                                                                          "Bearer keyB"})
        assert job.status_code == 202, job.text
    stolen = storage / "jobs" / job.json()["id"] / "input.wav"
    assert stolen.is_file()
    event, data = gradio_call(app_url, "encode", [server_file(str(stolen)), 8], HEADERS_A)
    assert event == "refused 422" and "not a file uploaded to this server" in data, data


@pytest.mark.e2e
def test_an_endless_file_as_input_neither_hangs_the_server_nor_the_call(app_url):
    started = time.monotonic()
    event, data = gradio_call(app_url, "encode", [server_file("/dev/zero"), 8], HEADERS_A)
    assert event == "refused 422" and "not a file uploaded to this server" in data and time.monotonic() - started < 10
    with httpx.Client(base_url=app_url, timeout=2) as client:
        assert client.get("/healthz").status_code == 200


@pytest.mark.e2e
def test_with_a_key_the_ui_and_its_uploads_work_as_before(app_url, shared_audio):
    from gradio_client import Client, handle_file

    with httpx.Client(base_url=app_url, timeout=20, follow_redirects=True) as browser:
        assert browser.get("/", headers={"Accept": "text/html"}).url.path == LOGIN_PATH
        assert browser.post(LOGIN_PATH, data={"key": "keyB"}).status_code == 200  # redirected to the page
        assert "gradio" in browser.get("/").text.lower()
    client = Client(app_url, verbose=False, headers=HEADERS_A)
    tokens = client.predict(handle_file(str(shared_audio / "en_question_24k.wav")), 4, api_name="/encode")
    assert tokens.endswith(".safetensors")


@pytest.mark.e2e
def test_a_browser_logs_in_and_its_live_socket_carries_the_cookie(app_url):
    """Headless Chromium: the login page, the Gradio page, then a websocket to /api/chat as
    live.js opens it (same origin, no key in the URL)."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is not installed: run `make test`, which installs it (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(app_url + "/")
            assert page.url.endswith(LOGIN_PATH)
            page.fill("input[name=key]", "keyA")
            page.click("button[type=submit]")
            page.wait_for_selector("moshi-live", timeout=30_000)  # the Gradio page, with the live client
            assert not page.evaluate("() => document.cookie.includes('moshi_key')")  # HttpOnly
            first = page.evaluate("""() => new Promise((resolve) => {
                const ws = new WebSocket(location.origin.replace('http', 'ws') + '/api/chat?codec=pcm');
                ws.binaryType = 'arraybuffer';
                ws.onmessage = (event) => { resolve(new Uint8Array(event.data)[0]); ws.close(); };
                ws.onclose = (event) => resolve('closed ' + event.code);
            })""")
            assert first == 0  # the handshake: the server took the cookie's key
        finally:
            browser.close()
