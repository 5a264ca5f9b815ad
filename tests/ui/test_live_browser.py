"""The page in a real headless Chromium with a fake microphone: the live tab, then the file tabs."""

import json
import shutil
import urllib.request
from pathlib import Path

import pytest
from app_server import serve_app

pytestmark = pytest.mark.e2e  # real servers, a browser

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
# What works as root in a closed network (../shared/browser-testing.md).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]


@pytest.fixture(scope="module")
def app_url(mimi_checkpoint, tiny_moshi):
    with serve_app(mimi_checkpoint, tiny_moshi, MOSHI_LIVE_SLOTS="1", MOSHI_LIVE_MAX_SECONDS="60") as url:
        yield url


@pytest.fixture(scope="module")
def page(shared_audio):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is not installed: run `make test`, which installs it (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    mic = shared_audio / "en_question_24k.wav"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True,
                                    args=CHROMIUM_ARGS + [f"--use-file-for-fake-audio-capture={mic}"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        yield page
        browser.close()


def server_stats(app_url: str) -> dict:
    with urllib.request.urlopen(app_url + "/api/chat/stats", timeout=10) as response:
        return json.load(response)


def moshi_stats(page) -> dict:
    return page.evaluate("() => ({...window.moshiStats})")


def test_live_tab_talks_with_moshi(app_url, page):
    page.goto(app_url + "/")
    live = page.locator("moshi-live")
    live.get_by_role("button", name="Start talking").click(timeout=30_000)
    page.wait_for_function("() => window.moshiStats.state === 'connected'", timeout=30_000)
    # The context runs at the browser's own rate (44.1 kHz in headless Chromium here), not 24 kHz
    # (Firefox refuses a microphone then): the worklet resamples, and 80 ms frames still leave at real time.
    rate = page.evaluate("() => window.moshiStats.contextRate")
    own_rate = "() => { const context = new AudioContext(); context.close(); return context.sampleRate; }"
    assert rate == page.evaluate(own_rate) and rate != 24000
    clock = "() => [performance.now(), window.moshiStats.framesSent]"
    t0, sent0 = page.evaluate(clock)
    page.wait_for_timeout(3000)
    t1, sent1 = page.evaluate(clock)
    assert (sent1 - sent0) * 80 == pytest.approx(t1 - t0, rel=0.15)
    # Moshi's audio is played while the microphone keeps sending, and its text shows up.
    page.wait_for_function("() => window.moshiStats.framesPlayed >= 15 && window.moshiStats.textMessages >= 1",
                           timeout=30_000)
    during = server_stats(app_url)["active"]
    assert len(during) == 1 and during[0]["frames_in"] >= 15 and during[0]["frames_out"] >= 15
    assert live.locator(".transcript").inner_text().strip()
    assert "round trip" in live.locator(".latency").inner_text()
    # The slower-than-real-time notice shows exactly when the page judges Moshi behind.
    pace, slow, hidden = page.evaluate("() => [window.moshiStats.pace, window.moshiStats.slow, "
                                       "document.querySelector('moshi-live .slow').hidden]")
    print(f"context {rate} Hz; Moshi's audio at {pace} of real time")
    assert hidden == (not slow)
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "live_tab.png"
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"screenshot: {screenshot}")

    live.get_by_role("button", name="Stop").click()
    page.wait_for_function("() => window.moshiStats.state === 'stopped'", timeout=5_000)
    sent = moshi_stats(page)["framesSent"]
    page.wait_for_timeout(500)
    stats = server_stats(app_url)
    assert stats["active"] == []  # the server has closed the session
    ended = stats["ended"][-1]
    assert ended["frames_in"] == sent  # every frame the page sent arrived, and no more
    assert ended["frames_out"] >= moshi_stats(page)["framesPlayed"]


def test_file_tabs_in_the_same_browser(app_url, page, shared_audio, tmp_path):
    page.goto(app_url + "/")
    page.get_by_role("tab", name="Audio → Mimi tokens").click()
    panel = page.get_by_role("tabpanel")
    panel.locator("input[type=file]").first.set_input_files(str(shared_audio / "en_question_24k.wav"))
    panel.get_by_role("button", name="Encode").click()
    link = panel.locator('a[download][href$=".safetensors"]').first
    link.wait_for(timeout=60_000)
    tokens = tmp_path / "speech.safetensors"
    with urllib.request.urlopen(link.get_attribute("href"), timeout=30) as response:
        tokens.write_bytes(response.read())
    from moshi_core.formats.tokens import load_tokens

    assert load_tokens(tokens).num_frames == 87
    # The codes are drawn: 8 codebooks x 8 px high, 87 frames x 4 px wide.
    picture = panel.locator("img").last
    picture.wait_for(timeout=30_000)
    page.wait_for_function("img => img.naturalWidth > 0", arg=picture.element_handle(), timeout=30_000)
    assert picture.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [348, 64]
    page.screenshot(path=str(ARTIFACTS / "encode_tab.png"))

    page.get_by_role("tab", name="Mimi tokens → audio").click()
    panel = page.get_by_role("tabpanel")
    panel.locator("input[type=file]").first.set_input_files(str(tokens))
    panel.get_by_role("button", name="Decode").click()
    panel.locator("audio[src]").first.wait_for(state="attached", timeout=60_000)

    page.get_by_role("tab", name="Dialogue from a file").click()
    panel = page.get_by_role("tabpanel")
    panel.locator("input[type=file]").first.set_input_files(str(shared_audio / "en_short_16k.wav"))
    panel.get_by_role("button", name="Let Moshi answer").click()
    panel.locator("audio[src]").nth(1).wait_for(state="attached", timeout=60_000)  # the user's, then Moshi's
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dialogue_tab.png"), full_page=True)
