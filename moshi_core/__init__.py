"""Our own PyTorch implementation of Kyutai's Mimi codec and Moshi language models.

    nn/          building blocks: streaming state, convs, SEANet, transformer, RVQ, conditioners
    models/      Mimi and the Moshi LM (temporal + depth transformers)
    kernels/     the matmul routing point, int8 weights, our C++ CPU kernels
    loading/     sources on the Hub, checkpoints (safetensors, GGUF), the model registry, voices
    formats/     audio files, PCM, token files, text tokens, subtitles
    inference/   sampling, streaming generation, codec, dialogue, speech-to-text, text-to-speech
    engines/     many conversations stepped as one batch (slots)
    cli/         `moshi-core`
    params.py    what a request may ask for (sampling, TTS), validated, shared by every front door
"""

# Nothing is imported here: a process that only checks requests (the API) imports the light
# modules it needs and never the model code.
__version__ = "0.1.0"
