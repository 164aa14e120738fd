# FREE-Fed data owner's image: free-client (export, inspect, submit, fetch, join,
# finetune) and free-bench (to simulate an owner from the glyph benchmark).
#
# Built with the same set-up command as the README (`make install`), minus the dev tools:
#   docker build -f docker/client.Dockerfile -t free-fed-client .
FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends make \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/free-fed
COPY . .

# PyPI's Linux torch wheel is a CUDA build; it runs on the CPU as well. Owners who want a
# smaller image install a CPU build of torch into /opt/venv first, as the Makefile keeps it.
ARG TORCH_SPEC=torch==2.13.0
ARG EXTRAS=cpu
RUN make install VENV=/opt/venv TORCH_SPEC="$TORCH_SPEC" EXTRAS="$EXTRAS" \
 && rm -rf /root/.cache/pip /var/lib/apt/lists/*

ENV PATH=/opt/venv/bin:$PATH \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1

ENTRYPOINT ["free-client"]
CMD ["--help"]
