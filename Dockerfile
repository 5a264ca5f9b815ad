# One image for every role; the command picks it:
#   python app.py                          web UI + live conversation + REST API (port 7860)
#   python -m api --port 8000              REST API alone (light: queues jobs on REDIS_URL)
#   celery -A workers worker -Q moshi.lm,moshi.codec -P threads -c 8 -n gpu0@%h   a GPU worker (batches dialogue jobs)
# The base image brings a CUDA build of PyTorch (inside the range pyproject.toml accepts),
# so installing the project adds no second torch.
FROM pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime

# g++: the CPU kernels (moshi_core/kernels/csrc/), built into the image below; CUDA runs without them.
# ffmpeg: Gradio encodes the TTS tab's streamed audio with it.
RUN apt-get update && apt-get install -y --no-install-recommends g++ ffmpeg && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY moshi_core moshi_core
COPY api api
COPY workers workers
RUN pip install --no-cache-dir ".[app]" && moshi-core build-kernels
COPY app.py .

# Weights (HF cache) and jobs live on volumes shared by the API and the workers.
ENV HF_HOME=/data/hf \
    MOSHI_STORAGE_DIR=/data/jobs \
    HOST=0.0.0.0 \
    PYTHONUNBUFFERED=1
VOLUME ["/data"]
EXPOSE 7860 8000
CMD ["python", "app.py"]
