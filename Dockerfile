# The gateway as a container: `docker build -t image-gateway .`
#   docker run -p 8080:8080 -e UPSTREAM_API_KEY=... -v $PWD/config:/app/config image-gateway
# It runs as an unprivileged numeric user and writes nothing outside /tmp (Python's bytecode is
# compiled at install time), so a read-only root filesystem with /tmp on an emptyDir or tmpfs
# works: `docker run --read-only --tmpfs /tmp ...`, or deploy/kubernetes/.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[fast]'

FROM python:3.11-slim
RUN groupadd --gid 10001 gateway && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin gateway
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
WORKDIR /app
COPY config/gateway.example.yaml /app/config/gateway.example.yaml
USER 10001:10001
ENV GATEWAY_CONFIG=/app/config/gateway.yaml PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TMPDIR=/tmp
EXPOSE 8080 9090
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz').status != 200)"
ENTRYPOINT ["gateway"]
CMD ["serve"]
