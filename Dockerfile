# One image for every role; the command picks it:
#   python app.py                          web UI + live conversation + REST API (port 7860)
#   python -m api --port 8000              REST API alone (light: queues jobs on REDIS_URL; set PORT for the health check)
#   celery -A workers worker -Q moshi.lm,moshi.codec -P threads -c 8 -n gpu0@%h   a GPU worker (batches dialogue jobs)
# The base image brings a CUDA build of PyTorch (inside the range pyproject.toml accepts),
# so installing the project adds no second torch. Checked by hadolint (tests/packaging/test_docker.py).
ARG BASE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime

# The wheel users install, built as tests/packaging/test_wheel.py builds and checks it.
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
# Unpinned: the base image's Ubuntu release fixes what these resolve to, and pins would break on its updates.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends g++ ffmpeg && rm -rf /var/lib/apt/lists/*

# Every role runs as this user; the volume's folders and the kernel cache are its own.
RUN useradd --create-home --uid 1000 moshi && mkdir -p /data/hf /data/jobs /opt/kernels \
    && chown -R moshi /data /opt/kernels
ENV HF_HOME=/data/hf \
    MOSHI_STORAGE_DIR=/data/jobs \
    TORCH_EXTENSIONS_DIR=/opt/kernels \
    HOST=0.0.0.0 \
    PYTHONUNBUFFERED=1

WORKDIR /app
# Only the wheel comes over, no sources: they would shadow the installed package for app.py,
# and the kernels below are built from what the wheel holds.
COPY --from=wheel /wheels /tmp/wheels
RUN pip install --no-cache-dir "$(echo /tmp/wheels/moshi_core-*.whl)[app]" && rm -rf /tmp/wheels
COPY app.py .

USER 1000
# Built by the user that loads them, into the folder it runs with: the first job does not wait a minute.
RUN moshi-core build-kernels

# Weights (HF cache) and jobs live on volumes shared by the app and the workers.
VOLUME ["/data"]
EXPOSE 7860 8000
# The web roles answer /healthz (PORT where it is not the app's 7860); compose gives workers their own check.
HEALTHCHECK --interval=30s --timeout=10s --start-period=2m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '7860'), timeout=5)"]
CMD ["python", "app.py"]
