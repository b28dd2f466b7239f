"""The container, as far as this machine allows. No image registry is reachable here, so the
official base image cannot be pulled. Two checks stand in:
- the Dockerfile's own steps run in a fresh virtual environment the way the image runs them: its
  build-stage RUN (pip install of the package, then pip removed), its ENV, its ENTRYPOINT + CMD
  (port made ephemeral), and its HEALTHCHECK command;
- where buildah and debootstrap are installed (Debian packages), deploy/build-without-registry.sh
  builds the Dockerfile unchanged on a Debian base made from Debian's mirror, and the image is run
  with `buildah run`: user, no pip or compiler, the service answering, its HEALTHCHECK, SIGTERM.
compose.yaml is checked for the two-instance setup it promises (docker compose is not here)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from tests.test_cli import free_port, wait_healthy
from tests.test_store_contract import PG_URL, _drop_schema, _postgres_store

ROOT = Path(__file__).resolve().parent.parent
IMAGE_VENV = "/opt/ringrelay"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in dockerfile_instructions():
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def test_the_image_is_slim_non_root_with_a_healthcheck_and_no_build_tools() -> None:
    build, final = stages()
    assert re.match(r"python:\$\{PYTHON_VERSION\}-slim AS build", build[0][1])
    assert final[0][1] == "python:${PYTHON_VERSION}-slim"
    final_words = dict(final)
    assert final_words["USER"] == "ringrelay"  # created with uid 10001
    assert "useradd --uid 10001" in final_words["RUN"]
    assert [a for w, a in final if w == "RUN"] == [final_words["RUN"]]  # nothing else installed
    assert not re.search(r"apt-get|gcc|build-essential|pip install", final_words["RUN"])
    assert f"COPY --from=build {IMAGE_VENV} {IMAGE_VENV}" in [
        f"COPY {a}" for w, a in final if w == "COPY"
    ]
    assert "/healthz" in final_words["HEALTHCHECK"]
    assert json.loads(final_words["ENTRYPOINT"]) == ["ringrelay"]
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignored and "!src/" in ignored  # the context is the package only


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The build stage's RUN, in a fresh venv: the same commands with the image's paths moved
    under a temporary directory (and pip's cache allowed: the image's --no-cache-dir only keeps
    the layer small)."""
    base = tmp_path_factory.mktemp("image")
    context = base / "src-context"
    context.mkdir()
    build, _ = stages()
    for word, args in build:
        if word == "COPY":
            *sources, dest = args.split()
            for source in sources:
                target = context / dest.removeprefix("./").rstrip("/") if dest != "./" else context
                if (ROOT / source).is_dir():
                    shutil.copytree(
                        ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__")
                    )
                else:
                    shutil.copy(ROOT / source, context / Path(source).name)
    (run,) = [args for word, args in build if word == "RUN"]
    venv = base / "opt-ringrelay"
    command = run.replace(IMAGE_VENV, str(venv)).replace(" --no-cache-dir", "")
    command = command.replace("python -m venv", f"{sys.executable} -m venv", 1)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(
        ["bash", "-c", command], cwd=context, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return venv


def image_env(venv: Path, home: Path) -> dict[str, str]:
    """The final stage's ENV over a clean environment (no PYTHONPATH: the installed package)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV")
        and not k.upper().startswith(("RINGRELAY_", "ANH"))
    }
    env["HOME"] = str(home)
    _, final = stages()
    for word, args in final:
        if word == "ENV":
            for key, value in re.findall(r"(\w+)=(\S+)", args):
                env[key] = value.replace(f"{IMAGE_VENV}/bin", str(venv / "bin")).replace(
                    "$PATH", os.environ["PATH"]
                )
    return env


async def test_the_image_steps_install_and_start_the_service(image_venv: Path, tmp_path) -> None:
    assert (image_venv / "bin" / "ringrelay").exists()
    assert not (image_venv / "bin" / "pip").exists()  # removed, as in the image
    _, final = stages()
    final_words = dict(final)
    entrypoint = json.loads(final_words["ENTRYPOINT"])
    cmd = json.loads(final_words["CMD"])
    port = free_port()
    cmd = [str(port) if arg == "8080" else arg for arg in cmd]
    home = tmp_path / "var-lib-ringrelay"  # WORKDIR
    home.mkdir()
    env = image_env(image_venv, home)
    assert env["PATH"].startswith(str(image_venv / "bin"))
    # The ringrelay on PATH is the installed one: its package lives in the venv.
    where = subprocess.run(
        ["python", "-c", "import ringrelay, sys; print(ringrelay.__file__, sys.prefix)"],
        env=env,
        cwd=home,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert str(image_venv) in where.stdout, where.stderr

    schema = f"rr_test_{uuid.uuid4().hex[:12]}"
    await _postgres_store(schema)
    env["RINGRELAY_DATABASE_URL"] = f"{PG_URL}?search_path={schema}"
    try:
        # Listening on 0.0.0.0 needs registrar authentication: an API key, as a deployment would.
        key = subprocess.run(
            [*entrypoint, "keys", "create", "--name", "container-test"],
            env=env,
            cwd=home,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert key.returncode == 0, key.stderr
        proc = subprocess.Popen(
            [*entrypoint, *cmd],
            env=env,
            cwd=home,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            wait_healthy(f"http://127.0.0.1:{port}", proc, seconds=30)
            health = json.loads(final_words["HEALTHCHECK"].split("CMD", 1)[1].strip())
            health = [h.replace(":8080/", f":{port}/") for h in health]
            probe = subprocess.run(health, env=env, cwd=home, capture_output=True, timeout=30)
            assert probe.returncode == 0, probe.stderr
            proc.send_signal(signal.SIGTERM)  # what `docker stop` sends
            # uvicorn shuts down gracefully, then re-raises the signal: exit status 143 in Docker.
            assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
            out = proc.stdout.read() if proc.stdout else ""
            assert "Application shutdown complete" in out
            assert "PostgreSQL" in out and "0.0.0.0" in out
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        probe = subprocess.run(health, env=env, cwd=home, capture_output=True, timeout=30)
        assert probe.returncode != 0  # the healthcheck fails once the service is gone
    finally:
        await _drop_schema(schema)


def test_compose_runs_two_instances_on_postgres_after_one_migration() -> None:
    doc = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = doc["services"]
    relays = [name for name in services if name.startswith("ringrelay-")]
    assert len(relays) == 2
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in relays:
        s = services[name]
        assert s["environment"]["RINGRELAY_DATABASE_URL"].startswith("postgresql://")
        assert "@postgres:5432/" in s["environment"]["RINGRELAY_DATABASE_URL"]
        assert s["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert s["command"][:1] == ["serve"] and "--workers" in s["command"]
        (port,) = s["ports"]
        assert port.startswith("127.0.0.1:")  # published on the host's loopback only
    assert len({services[n]["ports"][0] for n in relays}) == 2


BUILDAH_ENV = {"STORAGE_DRIVER": "vfs", "BUILDAH_ISOLATION": "chroot"}


def buildah(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | BUILDAH_ENV
    return subprocess.run(
        ["buildah", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.skipif(
    not (shutil.which("buildah") and shutil.which("debootstrap")),
    reason="buildah and debootstrap not installed (apt-get install buildah debootstrap)",
)
async def test_the_image_builds_without_a_registry_and_runs(tmp_path) -> None:
    tag = f"localhost/ringrelay:test-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | BUILDAH_ENV
    built = subprocess.run(
        [str(ROOT / "deploy/build-without-registry.sh"), tag],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-3000:]
    ctr = ""
    schema = f"rr_test_{uuid.uuid4().hex[:12]}"
    try:
        config = json.loads(buildah("inspect", "--type", "image", tag).stdout)["Docker"]["config"]
        assert config["User"] == "ringrelay"
        assert config["Entrypoint"] == ["ringrelay"]
        assert "/healthz" in " ".join(config["Healthcheck"]["Test"])
        ctr = buildah("from", "--name", f"rr-test-{uuid.uuid4().hex[:8]}", tag).stdout.strip()
        assert buildah("run", ctr, "--", "id", "-u").stdout.strip() == "10001"
        tools = buildah(
            "run",
            ctr,
            "--",
            "sh",
            "-c",
            "ls /opt/ringrelay/bin; command -v gcc cc make || echo no-build-tools",
        ).stdout
        assert "pip" not in tools.split() and "no-build-tools" in tools
        await _postgres_store(schema)
        # Named, so that the suite's fault tests (they kill unnamed connections) leave it alone.
        url = f"{PG_URL}?search_path={schema}&application_name=ringrelay-image-test"
        key = buildah(
            "run",
            "--env",
            f"RINGRELAY_DATABASE_URL={url}",
            ctr,
            "--",
            "ringrelay",
            "keys",
            "create",
            "--name",
            "image-test",
        )
        assert key.returncode == 0, key.stderr
        port = free_port()
        cmd = [str(port) if a == "8080" else a for a in config["Cmd"]]
        serve = subprocess.Popen(
            [
                "buildah",
                "run",
                "--env",
                f"RINGRELAY_DATABASE_URL={url}",
                ctr,
                "--",
                *config["Entrypoint"],
                *cmd,
            ],
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | BUILDAH_ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            wait_healthy(f"http://127.0.0.1:{port}", serve, seconds=60)
            health = config["Healthcheck"]["Test"][1:]  # after "CMD"
            health = [h.replace(":8080/", f":{port}/") for h in health]
            assert buildah("run", ctr, "--", *health).returncode == 0
            # `docker stop` signals the container's first process: here, the server itself.
            server = subprocess.run(
                ["pgrep", "-f", f"^/opt/ringrelay/bin/python .*--port {port}"],
                capture_output=True,
                text=True,
            ).stdout.split()
            assert len(server) == 1, server
            os.kill(int(server[0]), signal.SIGTERM)
            serve.wait(timeout=30)
            out = serve.stdout.read() if serve.stdout else ""
            assert "Application shutdown complete" in out, out
        finally:
            if serve.poll() is None:
                serve.kill()
                serve.wait(timeout=10)
    finally:
        if ctr:
            buildah("rm", ctr)
        buildah("rmi", tag)
        await _drop_schema(schema)
