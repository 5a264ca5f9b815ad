// Audio worklets of the live client: microphone capture and playback, at 24 kHz on the wire.
// The page asks for a 24 kHz AudioContext; where a browser runs it at another rate
// (`sampleRate` here), both sides resample linearly.

const WIRE_RATE = 24000;

// Linear resampler that carries its phase across blocks.
class Resampler {
  constructor(from, to) {
    this.step = from / to;
    this.pos = 0;
    this.last = 0;
  }

  process(input) {
    if (this.step === 1) return input;
    const out = [];
    for (; this.pos < input.length; this.pos += this.step) {
      const i = Math.floor(this.pos);
      const a = i === 0 ? this.last : input[i - 1];
      const b = input[i];
      const frac = this.pos - i;
      out.push(a + (b - a) * frac);
    }
    this.pos -= input.length;
    this.last = input[input.length - 1];
    return Float32Array.from(out);
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
