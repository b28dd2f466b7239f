# ringrelay as a container: `docker build -t ringrelay .` then see compose.yaml.
# Two stages: the build stage makes a virtual environment from wheels (every dependency ships
# manylinux wheels, so no compiler is needed even there); the final image gets that environment
# only, without pip, and runs as an unprivileged user.
# Where no image registry is reachable, deploy/build-without-registry.sh builds this file with
# buildah on a Debian base made from Debian's mirror (tests/test_container.py does, and runs it).

ARG PYTHON_VERSION=3.12

FROM python:${PYTHON_VERSION}-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN python -m venv /opt/ringrelay \
 && /opt/ringrelay/bin/pip install --no-cache-dir . \
 && /opt/ringrelay/bin/pip uninstall --yes pip

FROM python:${PYTHON_VERSION}-slim
RUN useradd --uid 10001 --user-group --no-log-init --shell /usr/sbin/nologin \
      --home-dir /var/lib/ringrelay --create-home ringrelay
COPY --from=build /opt/ringrelay /opt/ringrelay
ENV PATH=/opt/ringrelay/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER ringrelay
WORKDIR /var/lib/ringrelay
EXPOSE 8080
# /healthz answers while the process serves (no curl in the slim image: Python asks).
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
# Inside a container the service must listen on 0.0.0.0, which `serve` allows only with
# registrar authentication configured (RINGRELAY_AUTH_ISSUER, or API keys: `ringrelay keys
# create`). Several instances and `--workers` need PostgreSQL (RINGRELAY_DATABASE_URL).
ENTRYPOINT ["ringrelay"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
