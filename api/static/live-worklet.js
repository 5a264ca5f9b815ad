// Audio worklets of the live client: microphone capture and playback, at 24 kHz on the wire.
// The AudioContext runs at the device's rate (`sampleRate` here): Firefox refuses a microphone
// in a context of any other rate (its bug 1674892). So both sides resample, with a
// windowed-sinc filter that carries its history across blocks.

const WIRE_RATE = 24000;
const ZERO_CROSSINGS = 16; // of the sinc, each side of the kernel's centre
// The cut-off, as a share of the lower Nyquist rate: the Blackman window's transition band
// (about 5.5 / kernel length) ends below that Nyquist rate, so nothing above it folds back.
const PASS_BAND = 0.85;
const TABLE_STEPS = 512; // kernel values per input sample, interpolated linearly between

// Any rate to any rate: each output sample is the input low-passed (below both rates' Nyquist)
// and read at the output's time. Blocks of any length in, the samples they complete out.
class Resampler {
  constructor(from, to) {
    this.step = from / to; // input samples per output sample
    const cutoff = 0.5 * Math.min(1, to / from) * PASS_BAND; // cycles per input sample
    this.halfWidth = ZERO_CROSSINGS / (2 * cutoff); // the kernel's reach each side, in input samples
    this.table = new Float32Array(Math.ceil(this.halfWidth * TABLE_STEPS) + 2);
    for (let i = 0; i < this.table.length; i++) {
      const t = i / TABLE_STEPS;
      const x = Math.min(1, t / this.halfWidth);
      const blackman = 0.42 + 0.5 * Math.cos(Math.PI * x) + 0.08 * Math.cos(2 * Math.PI * x);
      const sinc = t === 0 ? 1 : Math.sin(2 * Math.PI * cutoff * t) / (2 * Math.PI * cutoff * t);
      this.table[i] = 2 * cutoff * sinc * blackman; // sums to 1 over the input samples: unit gain
    }
    this.history = new Float32Array(Math.ceil(this.halfWidth)); // silence before the stream
    this.pos = this.history.length; // the next output's time, as an index into history + block
  }

  process(input) {
    if (this.step === 1) return input;
    const data = new Float32Array(this.history.length + input.length);
    data.set(this.history);
    data.set(input, this.history.length);
    const out = [];
    for (; this.pos + this.halfWidth < data.length; this.pos += this.step) out.push(this.at(data, this.pos));
    const keep = Math.floor(this.pos - this.halfWidth); // the first sample a later output reads
    this.history = data.slice(keep);
    this.pos -= keep;
    return Float32Array.from(out);
  }

  at(data, t) {
    let sum = 0;
    for (let i = Math.ceil(t - this.halfWidth); i <= t + this.halfWidth; i++) {
      const d = Math.abs(i - t) * TABLE_STEPS;
      const k = Math.floor(d);
      sum += data[i] * (this.table[k] + (this.table[k + 1] - this.table[k]) * (d - k));
    }
    return sum;
  }
}

// Posts the microphone's samples (mono, 24 kHz) to the page, block by block.
class CaptureProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.resampler = new Resampler(sampleRate, WIRE_RATE);
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel) this.port.postMessage(this.resampler.process(channel));
    return true;
  }
}

// Plays Moshi's audio from a queue: a jitter buffer that starts playing once `startSamples`
// are queued, plays silence on an underrun and buffers again. Reports what it played.
class PlayerProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.startSamples = Math.round((options.processorOptions.bufferMs / 1000) * sampleRate);
    this.resampler = new Resampler(WIRE_RATE, sampleRate);
    this.chunks = [];
    this.offset = 0; // read position in chunks[0]
    this.queued = 0;
    this.playing = false;
    this.played = 0; // samples of Moshi's audio played, at the wire rate
    this.underruns = 0;
    this.port.onmessage = (event) => {
      const chunk = this.resampler.process(event.data);
      this.chunks.push(chunk);
      this.queued += chunk.length;
    };
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    if (!this.playing && this.queued >= this.startSamples) this.playing = true;
    let written = 0;
    while (this.playing && written < out.length && this.chunks.length) {
      const chunk = this.chunks[0];
      const n = Math.min(out.length - written, chunk.length - this.offset);
      out.set(chunk.subarray(this.offset, this.offset + n), written);
      written += n;
      this.offset += n;
      this.queued -= n;
      if (this.offset === chunk.length) {
        this.chunks.shift();
        this.offset = 0;
      }
    }
    out.fill(0, written);
    if (this.playing && written < out.length) {
      this.playing = false;
      this.underruns += 1;
    }
    if (written) {
      this.played += (written * WIRE_RATE) / sampleRate;
      this.port.postMessage({ played: this.played, queued: this.queued / sampleRate, underruns: this.underruns });
    }
    return true;
  }
}

registerProcessor("moshi-capture", CaptureProcessor);
registerProcessor("moshi-player", PlayerProcessor);
