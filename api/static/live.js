// The live conversation client: a <moshi-live> element that talks to /api/chat.
//
// Microphone -> AudioWorklet (at the device's rate, resampled to 24 kHz; echo cancellation and
// noise suppression requested) -> 80 ms frames of int16 PCM over the websocket (`codec=pcm`, our
// documented variant of the protocol); Moshi's audio comes back the same way into a small
// jitter buffer, its text is shown as it arrives, and a notice says when the server cannot keep
// up with real time. window.moshiStats exposes the counters (tests read them).

(() => {
  const FRAME = 1920; // 80 ms at 24 kHz
  const FRAME_MS = 80;
  // Moshi keeps up when a second of its audio arrives each second. Judged over the last PACE_MS,
  // with two thresholds so that the notice does not flicker at the edge.
  const PACE_MS = 4000;
  const SLOW_BELOW = 0.9;
  const RECOVERED_AT = 0.95;
  const SLOW_NOTICE = "This machine is slower than real time: Moshi's voice will stutter. A GPU keeps up.";
  const KIND = { handshake: 0, audio: 1, text: 2, metadata: 4, error: 5 };
  const scriptUrl = document.currentScript ? document.currentScript.src : location.origin + "/api/chat/static/live.js";
  const workletUrl = new URL("live-worklet.js", scriptUrl).href;
  const chatUrl = new URL("../../chat", scriptUrl);
  chatUrl.protocol = chatUrl.protocol === "https:" ? "wss:" : "ws:";

  const stats = (window.moshiStats = {
    state: "idle", framesSent: 0, framesReceived: 0, framesPlayed: 0, textMessages: 0,
    underruns: 0, latencyMs: null, bufferMs: 0, error: null, loading: null, pace: null, slow: false,
    contextRate: null,
  });

  const TEMPLATE = `
    <style>
      moshi-live { display: block; font-family: inherit; }
      moshi-live .row { display: flex; flex-wrap: wrap; gap: 12px; align-items: center; margin: 8px 0; }
      moshi-live label { display: flex; flex-direction: column; font-size: 0.85em; }
      moshi-live input[type=number] { width: 7em; }
      moshi-live .dot { width: 12px; height: 12px; border-radius: 50%; background: #999; display: inline-block; }
      moshi-live .dot.connected { background: #2a2; } moshi-live .dot.connecting { background: #e90; }
      moshi-live .dot.error { background: #d22; }
      moshi-live .transcript { min-height: 6em; max-height: 16em; overflow-y: auto; padding: 8px;
        border: 1px solid #8884; border-radius: 6px; white-space: pre-wrap; }
      moshi-live .counters { font-size: 0.8em; opacity: 0.75; }
      moshi-live .slow { padding: 6px 10px; border: 1px solid #d90; border-radius: 6px; background: #fd03; }
    </style>
    <div class="row">
      <button class="start" type="button">Start talking</button>
      <button class="stop" type="button" disabled>Stop</button>
      <span class="dot"></span><span class="status">idle</span>
      <span class="latency"></span>
    </div>
    <div class="row">
      <label>Text temperature <input class="text_temperature" type="number" step="0.05" min="0" max="2" value="0.7"></label>
      <label>Text top-k <input class="text_topk" type="number" step="1" min="0" value="25"></label>
      <label>Audio temperature <input class="audio_temperature" type="number" step="0.05" min="0" max="2" value="0.8"></label>
      <label>Audio top-k <input class="audio_topk" type="number" step="1" min="0" value="250"></label>
      <label>Seed (empty: random) <input class="seed" type="number" step="1" min="0"></label>
    </div>
    <div class="slow" role="status" hidden>${SLOW_NOTICE}</div>
    <div class="transcript" aria-live="polite"></div>
    <div class="counters"></div>`;

  // Seconds of Moshi's audio received per second over the last PACE_MS, from its first frame
  // on; slow below SLOW_BELOW until it is back at RECOVERED_AT. Below 1 the machine running
  // Moshi is slower than real time, and no buffer saves the voice from stuttering.
  class Pace {
    constructor() {
      this.arrivals = [];
      this.first = null;
      this.ratio = null;
      this.slow = false;
    }

    frame(now) {
      if (this.first === null) this.first = now;
      this.arrivals.push(now);
    }

    update(now) {
      while (this.arrivals.length && this.arrivals[0] <= now - PACE_MS) this.arrivals.shift();
      if (this.first !== null && now - this.first >= PACE_MS) {
        this.ratio = (this.arrivals.length * FRAME_MS) / PACE_MS;
        this.slow = this.ratio < (this.slow ? RECOVERED_AT : SLOW_BELOW);
      }
      return this.slow;
    }
  }

  class MoshiLive extends HTMLElement {
    connectedCallback() {
      if (this.ui) return;
      this.innerHTML = TEMPLATE;
      this.ui = (name) => this.querySelector("." + name);
      this.ui("start").onclick = () => this.start().catch((e) => this.fail(String(e)));
      this.ui("stop").onclick = () => this.stop("stopped");
      this.timer = setInterval(() => this.render(), 250);
    }

    setState(state, detail) {
      stats.state = state;
      this.ui("dot").className = "dot " + state;
      this.ui("status").textContent = detail || state;
      const live = state === "connecting" || state === "connected";
      this.ui("start").disabled = live;
      this.ui("stop").disabled = !live;
    }

    render() {
      const latency = stats.latencyMs === null ? "" : `round trip ${Math.round(stats.latencyMs)} ms · `;
      this.ui("latency").textContent = stats.state === "connected" ? `${latency}buffer ${Math.round(stats.bufferMs)} ms` : "";
      this.ui("counters").textContent = `frames sent ${stats.framesSent} · received ${stats.framesReceived}` +
        ` · played ${stats.framesPlayed} · text ${stats.textMessages} · underruns ${stats.underruns}`;
      stats.slow = stats.state === "connected" && this.pace.update(performance.now());
      stats.pace = this.pace ? this.pace.ratio : null;
      this.ui("slow").hidden = !stats.slow;
    }

    query() {
      const params = new URLSearchParams({ codec: "pcm", progress: "1" });
      for (const name of ["text_temperature", "text_topk", "audio_temperature", "audio_topk", "seed"]) {
        const value = this.ui(name).value;
        if (value !== "") params.set(name, value);
      }
      return params;
    }

    async start() {
      Object.assign(stats, { framesSent: 0, framesReceived: 0, framesPlayed: 0, textMessages: 0,
        underruns: 0, latencyMs: null, bufferMs: 0, error: null, loading: null, pace: null, slow: false });
      this.pace = new Pace();
      this.ui("transcript").textContent = "";
      this.setState("connecting", "connecting…");
      this.mic = await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
      });
      // At the device's rate: Firefox refuses a microphone in a context of another rate (its bug
      // 1674892). The worklets resample to and from the wire's 24 kHz.
      this.context = new AudioContext();
      stats.contextRate = this.context.sampleRate;
      await this.context.audioWorklet.addModule(workletUrl);
      this.player = new AudioWorkletNode(this.context, "moshi-player", { processorOptions: { bufferMs: 160 } });
      this.player.connect(this.context.destination);
      this.player.port.onmessage = ({ data }) => {
        stats.framesPlayed = Math.floor(data.played / FRAME);
        stats.bufferMs = data.queued * 1000;
        stats.underruns = data.underruns;
      };
      this.sentAt = [];
      this.pending = new Float32Array(0);
      this.socket = new WebSocket(chatUrl.href + "?" + this.query());
      this.socket.binaryType = "arraybuffer";
      this.socket.onmessage = (event) => this.receive(new Uint8Array(event.data));
      this.socket.onclose = (event) => this.closed(event);
    }

    startCapture() {
      const capture = new AudioWorkletNode(this.context, "moshi-capture");
      capture.port.onmessage = ({ data }) => this.capture(data);
      this.context.createMediaStreamSource(this.mic).connect(capture);
      this.captureNode = capture;
      this.setState("connected");
    }

    capture(samples) {
      const joined = new Float32Array(this.pending.length + samples.length);
      joined.set(this.pending);
      joined.set(samples, this.pending.length);
      let start = 0;
      for (; start + FRAME <= joined.length; start += FRAME) {
        if (this.socket.readyState !== WebSocket.OPEN) return;
        const message = new Uint8Array(1 + 2 * FRAME);
        const pcm = new DataView(message.buffer, 1);
        for (let i = 0; i < FRAME; i++) {
          const s = Math.max(-1, Math.min(1, joined[start + i]));
          pcm.setInt16(2 * i, Math.round(s * 32767), true);
        }
        message[0] = KIND.audio;
        this.socket.send(message);
        this.sentAt.push(performance.now());
        stats.framesSent += 1;
      }
      this.pending = joined.slice(start);
    }

    receive(message) {
      const payload = message.subarray(1);
      if (message[0] === KIND.handshake) {
        this.startCapture();
      } else if (message[0] === KIND.audio) {
        const view = new DataView(payload.buffer, payload.byteOffset, payload.byteLength);
        const pcm = new Float32Array(payload.byteLength / 2);
        for (let i = 0; i < pcm.length; i++) pcm[i] = view.getInt16(2 * i, true) / 32768;
        this.player.port.postMessage(pcm, [pcm.buffer]);
        // Output frame k answers input frame k + 1 (the first input frame only primes the model).
        const sent = this.sentAt[stats.framesReceived + 1];
        if (sent !== undefined) stats.latencyMs = performance.now() - sent;
        stats.framesReceived += 1;
        this.pace.frame(performance.now());
      } else if (message[0] === KIND.text) {
        stats.textMessages += 1;
        const box = this.ui("transcript");
        box.textContent += new TextDecoder().decode(payload);
        box.scrollTop = box.scrollHeight;
      } else if (message[0] === KIND.metadata) {
        // Before the handshake, while the model loads: its stage and download progress.
        const report = JSON.parse(new TextDecoder().decode(payload));
        if (report.loading && stats.state === "connecting") {
          stats.loading = report.text;
          this.setState("connecting", `loading the model · ${report.text}`);
        }
      } else if (message[0] === KIND.error) {
        stats.error = new TextDecoder().decode(payload);
      }
    }

    closed(event) {
      if (stats.state === "stopped") return;
      const reason = stats.error || (event.wasClean ? "conversation ended" : `connection lost (${event.code})`);
      const failed = stats.error && !stats.error.startsWith("time limit");
      this.release();
      this.setState(failed ? "error" : "ended", reason);
    }

    fail(message) {
      stats.error = message;
      this.release();
      this.setState("error", message);
    }

    stop(state) {
      this.setState(state);
      if (this.socket && this.socket.readyState <= WebSocket.OPEN) this.socket.close(1000);
      this.release();
    }

    release() {
      if (this.mic) this.mic.getTracks().forEach((track) => track.stop());
      if (this.context) this.context.close();
      this.mic = this.context = null;
    }
  }

  if (!customElements.get("moshi-live")) customElements.define("moshi-live", MoshiLive);
})();
