# psfw server image: one parameter-server shard per container, configured by PSFW_*
# environment variables (see `psfw server --help`). The same image runs worker
# processes (entrypoint `psfw worker ...`).
#   docker build -t psfw .
#   docker run -e PSFW_SHARD=0 -e PSFW_SHARDS=2 -e PSFW_TLS_CERT=/run/secrets/cert.pem \
#     -e PSFW_TLS_KEY=/run/secrets/key.pem -e PSFW_TOKEN_FILE=/run/secrets/token ... psfw
# A shard listening on the container's network refuses to start without TLS (a token
# alone would cross the network in clear) unless PSFW_INSECURE=1 says that the
# network is private.
# With Ray, for `psfw ray` (EXTRAS: psfw's extras, comma-separated; REQUIREMENT: one
# more pip requirement, resolved with psfw's): ray[default] adds Ray's dashboard and
# job server, which a KubeRay RayJob submits to (examples/deploy/rayjob.yaml).
#   docker build --build-arg EXTRAS=ray -t psfw-ray .
#   docker build --build-arg EXTRAS=ray --build-arg REQUIREMENT="ray[default]" -t psfw-ray .

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY psfw ./psfw
COPY compute ./compute
COPY services ./services
COPY protos ./protos
ARG EXTRAS=""
ARG REQUIREMENT=""
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".${EXTRAS:+[$EXTRAS]}" ${REQUIREMENT:+"$REQUIREMENT"}

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 psfw \
    && mkdir -p /home/psfw/runs /checkpoints \
    && chown 10001:10001 /home/psfw/runs /checkpoints
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001:10001
WORKDIR /home/psfw
ENV PSFW_LISTEN=0.0.0.0:50051 PSFW_SHARD=0 PSFW_SHARDS=1
EXPOSE 50051
# --local: probe with the shard's own settings, so the check works for every setup
# the shard accepts: plaintext, TLS (PSFW_TLS_CERT/PSFW_TLS_KEY: it trusts that
# certificate under the name it carries) and mutual TLS (PSFW_TLS_CLIENT_CA: it
# presents that certificate, which must then be signed by that CA).
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["psfw", "health", "--local", "127.0.0.1:50051"]
ENTRYPOINT ["psfw", "server"]
