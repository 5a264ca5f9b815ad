"""The live client's scripts run in node: the worklet's resampler (the microphone at the
device's rate to 24 kHz, Moshi's 24 kHz to the device's rate, block by block), and the page's
notice when Moshi's audio arrives slower than real time."""

import json
import shutil
import subprocess

import pytest
from servers import REPO_DIR

STATIC = REPO_DIR / "api" / "static"

# Loads the worklet file with a worklet scope's globals stubbed, then
# resamples tones through it, fed in blocks of varying size, and reports what came out.
WORKLET_CHECK = r"""
const fs = require("fs");
// A function of the worklet scope's globals, not a vm context: a context's globals are slow
// to look up, as a browser's are not.
const worklet = new Function("sampleRate", "registerProcessor", "AudioWorkletProcessor",
                             fs.readFileSync(process.argv.at(-1), "utf8") + "\nreturn Resampler;");
const Resampler = worklet(48000, () => {}, class {});

function tone(freq, rate, seconds, amplitude) {
  const length = Math.round(rate * seconds);
  return Float32Array.from({ length }, (_, n) => amplitude * Math.sin(2 * Math.PI * freq * n / rate));
}

function resample(from, to, input, blocks) {
  const r = new Resampler(from, to);
  const pieces = [];
  for (let i = 0, b = 0; i < input.length; b++) {
    const n = blocks[b % blocks.length];
    pieces.push(r.process(input.subarray(i, i + n)));
    i += n;
  }
  const out = new Float32Array(pieces.reduce((a, p) => a + p.length, 0));
  pieces.reduce((at, p) => (out.set(p, at), at + p.length), 0);
  return { out, reach: Math.ceil(r.halfWidth / r.step) + 1 };
}

const report = {};
for (const [from, to] of [[48000, 24000], [44100, 24000], [24000, 48000], [24000, 44100]]) {
  const input = tone(1000, from, 1, 0.5);
  const { out, reach } = resample(from, to, input, [128, 1, 77, 128, 300, 5]);
  const whole = resample(from, to, input, [input.length]).out;
  let error = 0, blockDiff = 0;
  // The last `reach` samples wait for input that never comes: the stream goes on in a browser.
  for (let n = reach; n < out.length; n++) {
    error = Math.max(error, Math.abs(out[n] - 0.5 * Math.sin(2 * Math.PI * 1000 * n / to)));
  }
  for (let n = 0; n < out.length; n++) blockDiff = Math.max(blockDiff, Math.abs(out[n] - whole[n]));
  report[`${from}->${to}`] = { length: out.length, expected: input.length * to / from, reach, error, blockDiff,
                               sameLength: out.length === whole.length };
}
// Above the output's Nyquist rate nothing may fold back (13 kHz would alias to 11 kHz at 24 kHz).
const alias = resample(48000, 24000, tone(13000, 48000, 1, 0.5), [128]);
const folded = alias.out.subarray(alias.reach);
report.aliasRms = Math.sqrt(folded.reduce((a, x) => a + x * x, 0) / folded.length);
console.log(JSON.stringify(report));
"""


# Loads live.js with the browser's objects stubbed (a microphone, an AudioContext at 48 kHz, a
# websocket that never sends), starts a conversation, then hands it Moshi's frames on a
# simulated clock: real time, then 80% of it, then real time again; reports the notice over time.
PAGE_CHECK = r"""
const vm = require("vm");
const fs = require("fs");
let now = 0, Live = null, template = "";
const elements = {};
const asked = {};
class HTMLElement {
  set innerHTML(html) { template = html; }
  querySelector(selector) { return (elements[selector.slice(1)] ??= { hidden: false, value: "", textContent: "" }); }
}
class AudioContext {
  constructor(options) { asked.context = options ?? null; this.sampleRate = 48000; this.destination = {};
                         this.audioWorklet = { addModule: async () => {} }; }
  createMediaStreamSource() { return { connect() {} }; }
  close() {}
}
class AudioWorkletNode { constructor() { this.port = { postMessage() {} }; } connect() {} }
class WebSocket { constructor() { this.readyState = 1; } send() {} close() {} }
WebSocket.OPEN = 1;
const page = {
  window: {}, document: { currentScript: null }, location: { origin: "http://page" }, URL, URLSearchParams, TextDecoder,
  performance: { now: () => now }, setInterval: () => 0, HTMLElement, AudioContext, AudioWorkletNode, WebSocket,
  customElements: { get: () => undefined, define: (name, cls) => { Live = cls; } },
  navigator: { mediaDevices: { getUserMedia: async (constraints) => { asked.microphone = constraints.audio;
                                                                       return { getTracks: () => [] }; } } },
};
vm.createContext(page);
vm.runInContext(fs.readFileSync(process.argv.at(-1), "utf8"), page);
(async () => {
  const live = new Live();
  live.connectedCallback();
  await live.start();
  live.receive(Uint8Array.of(0)); // the handshake
  const frame = new Uint8Array(1 + 2 * 1920);
  frame[0] = 1;
  const timeline = [];
  let next = 0;
  for (now = 0; now <= 24000; now += 10) {
    const spacing = now < 6000 || now >= 14000 ? 80 : 100; // ms between frames: real time, 0.8 of it, real time
    if (now >= next) { live.receive(frame); next += spacing; }
    if (now % 250 === 0) {
      live.render();
      timeline.push([now, page.window.moshiStats.slow, elements.slow.hidden, page.window.moshiStats.pace]);
    }
  }
  console.log(JSON.stringify({ asked, contextRate: page.window.moshiStats.contextRate, timeline,
                               notice: template.includes("slower than real time") }));
})();
"""


def _node(script: str, path) -> dict:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed (apt-get install nodejs)")
    done = subprocess.run([node, "-e", script, str(path)], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def report() -> dict:
    return _node(WORKLET_CHECK, STATIC / "live-worklet.js")


@pytest.mark.parametrize("rates", ["48000->24000", "44100->24000", "24000->48000", "24000->44100"])
def test_a_tone_keeps_its_frequency_amplitude_and_phase(report, rates):
    r = report[rates]
    assert r["error"] < 1e-4  # of 0.5, against the ideal 1 kHz sine at the output rate, every block boundary included
    assert r["blockDiff"] < 1e-6 and r["sameLength"]  # the blocks' sizes change nothing
    assert r["expected"] - r["reach"] - 1 <= r["length"] <= r["expected"]  # all but the kernel's reach, so far


def test_nothing_above_the_lower_nyquist_rate_folds_back(report):
    assert report["aliasRms"] < 1e-4  # of 0.35, below -70 dB: a linear interpolator passes it whole


def test_the_page_captures_at_the_devices_rate_and_says_when_moshi_falls_behind():
    page = _node(PAGE_CHECK, STATIC / "live.js")
    # No 24 kHz asked of the context or the microphone: the worklets resample (Firefox bug 1674892).
    assert page["asked"]["context"] is None and "sampleRate" not in page["asked"]["microphone"]
    assert page["contextRate"] == 48000 and page["notice"]
    timeline = page["timeline"]
    assert all(hidden == (not slow) for _, slow, hidden, _ in timeline)
    slow_at = [t for t, slow, _, _ in timeline if slow]
    # At 0.8 of real time from 6 s, the last 4 s drop below 0.9 after 2 s; back at real time
    # from 14 s, they reach 0.95 after 3 s.
    assert slow_at and 8000 <= slow_at[0] <= 8500 and 16750 <= slow_at[-1] <= 17250
    assert slow_at == list(range(slow_at[0], slow_at[-1] + 1, 250))  # one stretch, no flicker
    assert timeline[-1][3] == pytest.approx(1.0, abs=0.03)
