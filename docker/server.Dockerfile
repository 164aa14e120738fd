# FREE-Fed aggregator image.
#
# CUDA-capable: PyPI's Linux torch wheels carry their own CUDA runtime, so the image needs
# no CUDA base; with the NVIDIA container toolkit (`docker run --gpus all`) the engine runs
# on the GPU, and without a GPU the same image runs on the CPU. onnxruntime-gpu likewise
# falls back to its CPU provider.
#
# Built with the same set-up command as the README (`make install`), minus the dev tools:
#   docker build -f docker/server.Dockerfile -t free-fed-server .
FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends make \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/free-fed
COPY . .

# A pinned torch release from PyPI (a CUDA build on x86_64); override for another build.
ARG TORCH_SPEC=torch==2.13.0
ARG EXTRAS=gpu
RUN make install VENV=/opt/venv TORCH_SPEC="$TORCH_SPEC" EXTRAS="$EXTRAS" \
 && rm -rf /root/.cache/pip /var/lib/apt/lists/*

ENV PATH=/opt/venv/bin:$PATH \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1

# 9091 exchange (gRPC, TLS), 9092 Flower front for owners' SuperNodes (TLS).
EXPOSE 9091 9092
VOLUME ["/srv/free-home"]
ENTRYPOINT ["free-server"]
CMD ["start", "--home", "/srv/free-home"]
