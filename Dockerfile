# psfw server image: one parameter-server shard per container. The same image runs
# worker processes (override the command).
#   docker build -t psfw .
#   docker run -p 50051:50051 psfw --shard 0 --of 2 --listen 0.0.0.0:50051

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY psfw ./psfw
COPY compute ./compute
COPY services ./services
COPY protos ./protos
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 psfw
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001:10001
WORKDIR /home/psfw
EXPOSE 50051
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["psfw", "health", "127.0.0.1:50051"]
ENTRYPOINT ["psfw", "server"]
CMD ["--shard", "0", "--of", "1", "--listen", "0.0.0.0:50051"]
