# cxr-node image. CPU by default:
#   docker build -t cxr-node .
# CUDA sites (onnxruntime-gpu on an NVIDIA CUDA/cuDNN runtime base):
#   docker build -t cxr-node:cuda --build-arg BASE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 --build-arg ORT=gpu .
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}
ARG ORT=cpu

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv && rm -rf /var/lib/apt/lists/*; \
    fi \
 && python3 -m venv /opt/venv

WORKDIR /src
COPY pyproject.toml README.md ./
COPY node ./node
COPY ai ./ai
COPY storage ./storage
COPY training ./training
COPY config ./config
RUN pip install --no-cache-dir . \
 && if [ "$ORT" = "gpu" ]; then pip uninstall -y onnxruntime && pip install --no-cache-dir onnxruntime-gpu; fi \
 && mkdir -p /etc/cxr-node /var/lib/cxr-node \
 && sed 's#^data_dir = .*#data_dir = "/var/lib/cxr-node"  # received files, results, the SQLite database#' \
      config/node.toml > /etc/cxr-node/node.toml

RUN useradd --system --home /var/lib/cxr-node cxr && chown cxr /var/lib/cxr-node
USER cxr
VOLUME /var/lib/cxr-node
EXPOSE 11112
# healthy = the SCP answers a C-ECHO, a worker's heartbeat is recent and due jobs are being worked off
# (cxr-node health; a TCP connect would stay green with the worker dead and every image queued)
HEALTHCHECK --interval=30s --timeout=20s --start-period=120s --retries=3 \
  CMD ["cxr-node", "--log-level", "ERROR", "health", "--config", "/etc/cxr-node/node.toml"]
ENTRYPOINT ["cxr-node"]
CMD ["serve", "--config", "/etc/cxr-node/node.toml"]
