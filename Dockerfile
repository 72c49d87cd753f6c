# RunPod serverless worker: CUDA runtime, Python 3.12, the CUDA build of torch, the worker.
#
#   docker build -t lora-worker .
#   docker build -t lora-worker --build-arg BAKE_MODEL=stabilityai/stable-diffusion-xl-base-1.0 .
#
# Models come from the Hugging Face cache on the network volume by default
# (HF_HOME=/runpod-volume/huggingface-cache, where RunPod's cached models also live);
# BAKE_MODEL downloads one into the image at build time instead. Nothing is downloaded at run time.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG BAKE_MODEL=""

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/runpod-volume/huggingface-cache \
    HF_HUB_CACHE=/opt/hf-baked/hub \
    HF_HUB_OFFLINE=1 \
    STORAGE_DIR=/runpod-volume/storage \
    LOG_LEVEL=INFO

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv

WORKDIR /app

# torch first, from the CUDA index (requirements.txt pins the same version: the CPU build in CI).
COPY requirements.txt ./
RUN pip install "torch==$(sed -n 's/^torch==//p' requirements.txt)" --index-url "${TORCH_INDEX_URL}" \
    && pip install -r requirements.txt

RUN if [ -n "${BAKE_MODEL}" ]; then \
        HF_HUB_OFFLINE=0 python -c "import sys; from huggingface_hub import snapshot_download; snapshot_download(sys.argv[1], cache_dir='/opt/hf-baked/hub')" "${BAKE_MODEL}"; \
    fi

COPY config/ config/
COPY services/ services/
COPY rp_handler.py test_input.json ./

CMD ["python", "-u", "rp_handler.py"]
