# One image for every role; the command picks it:
#   python app.py                          web UI + live conversation + REST API (port 7860)
#   python -m api --port 8000              REST API alone (light: queues jobs on REDIS_URL)
#   celery -A workers worker -Q moshi.lm,moshi.codec -P threads -c 8 -n gpu0@%h   a GPU worker (batches dialogue jobs)
# The base image brings a CUDA build of PyTorch (inside the range pyproject.toml accepts),
# so installing the project adds no second torch.
ARG BASE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime

# The wheel users install, built as tests/test_wheel.py builds and checks it.
FROM ${BASE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY moshi_core moshi_core
COPY api api
COPY workers workers
COPY ui ui
RUN pip wheel --no-cache-dir --no-deps -w /wheels .

FROM ${BASE}
# g++: the CPU kernels (moshi_core/kernels/csrc/), built into the image below; CUDA runs without them.
# ffmpeg: Gradio encodes the TTS tab's streamed audio with it.
RUN apt-get update && apt-get install -y --no-install-recommends g++ ffmpeg && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# Only the wheel comes over, no sources: they would shadow the installed package for app.py,
# and the kernels below are built from what the wheel holds.
COPY --from=wheel /wheels /tmp/wheels
RUN pip install --no-cache-dir "$(echo /tmp/wheels/moshi_core-*.whl)[app]" && rm -rf /tmp/wheels \
    && moshi-core build-kernels
COPY app.py .

# Weights (HF cache) and jobs live on volumes shared by the API and the workers.
ENV HF_HOME=/data/hf \
    MOSHI_STORAGE_DIR=/data/jobs \
    HOST=0.0.0.0 \
    PYTHONUNBUFFERED=1
VOLUME ["/data"]
EXPOSE 7860 8000
CMD ["python", "app.py"]
