# The gateway as a container: `docker build -t image-gateway .`
#   docker run -p 8080:8080 -e UPSTREAM_API_KEY=... -v $PWD/config:/app/config image-gateway
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[fast]'

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 gateway
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
WORKDIR /app
COPY config/gateway.example.yaml /app/config/gateway.example.yaml
USER gateway
ENV GATEWAY_CONFIG=/app/config/gateway.yaml PYTHONUNBUFFERED=1
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz').status != 200)"
ENTRYPOINT ["gateway"]
CMD ["serve"]
