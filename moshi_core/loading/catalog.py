"""The models this project knows by name: the defaults of every front door.

A source is a Hub repo id (optionally `@revision`), an `hf://` URI or a local folder laid out
like these repos; any other repo with the same layout works too.
"""

from moshi_core.loading.hub import DEFAULT_MIMI_SOURCE

DEFAULT_LM_SOURCE = "kyutai/moshika-candle-q8"
DEFAULT_STT_SOURCE = "kyutai/stt-1b-en_fr"
DEFAULT_TTS_SOURCE = "kyutai/tts-1.6b-en_fr"
DEFAULT_VOICE_REPO = "kyutai/tts-voices"
DEFAULT_VOICE = "expresso/ex03-ex01_happy_001_channel1_334s.wav"  # Kyutai's default in their examples

SUPPORTED_MODELS = {
    "kyutai/moshika-pytorch-bf16": "Moshi, female voice, bfloat16 (15.4 GB)",
    "kyutai/moshiko-pytorch-bf16": "Moshi, male voice, bfloat16 (15.4 GB)",
    "kyutai/moshika-candle-q8": "Moshi, female voice, 8-bit GGUF, kept int8 (8.2 GB)",
    "kyutai/moshiko-candle-q8": "Moshi, male voice, 8-bit GGUF, kept int8 (8.2 GB)",
    "kyutai/moshika-candle-bf16": "Moshi, female voice, Candle bfloat16",
    "kyutai/moshiko-candle-bf16": "Moshi, male voice, Candle bfloat16",
    "kyutai/moshika-pytorch-q8": "Moshi, female voice, row-wise int8 (bitsandbytes layout)",
    "kyutai/moshiko-pytorch-q8": "Moshi, male voice, row-wise int8 (bitsandbytes layout)",
}
STT_MODELS = {
    "kyutai/stt-1b-en_fr": "speech to text, English and French, words 0.5 s after they are said",
    "kyutai/stt-2.6b-en": "speech to text, English, words 2.5 s after they are said",
}
TTS_MODELS = {
    "kyutai/tts-1.6b-en_fr": f"text to speech, English and French, voices from {DEFAULT_VOICE_REPO}",
}

__all__ = ["DEFAULT_LM_SOURCE", "DEFAULT_MIMI_SOURCE", "DEFAULT_STT_SOURCE", "DEFAULT_TTS_SOURCE",
           "DEFAULT_VOICE", "DEFAULT_VOICE_REPO", "STT_MODELS", "SUPPORTED_MODELS", "TTS_MODELS"]
