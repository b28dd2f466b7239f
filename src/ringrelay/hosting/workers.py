"""`ringrelay serve --workers N`: N processes behind one listening socket (uvicorn's supervisor
binds it once and each worker process accepts on it), each with its own store pool and provider
connections. The supervisor restarts a worker that dies; on SIGTERM/SIGINT it forwards SIGTERM to
every worker, and each shuts down gracefully as a single `serve` does: in-flight deliveries finish
and are recorded, within the webhook deadline plus 2 s.

Several processes need a store they can share: PostgreSQL. A SQLite file belongs to one process
(its writer would serialise the workers and its ledger claims assume one process), so workers are
refused with it."""

from __future__ import annotations

import copy
import gc
import os
from typing import Any

from fastapi import FastAPI

from ringrelay.config import ConfigError, Settings, load_settings

FACTORY = "ringrelay.hosting.workers:worker_app"


def check_workers(settings: Settings, workers: int) -> None:
    if workers < 1:
        raise ConfigError("--workers: at least 1")
    if workers > 1 and settings.database_url.startswith("sqlite:"):
        raise ConfigError(
            f"--workers {workers}: several processes cannot share a SQLite file; set "
            "RINGRELAY_DATABASE_URL to PostgreSQL (postgresql://user@host:5432/db, see README, "
            "Deploy) or run one worker"
        )


def log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging, applied in every worker: ringrelay's own records too, and the access
    log without the webhook's `?code=` secret (the same filter as a single `serve`)."""
    from uvicorn.config import LOGGING_CONFIG

    config: dict[str, Any] = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"redact_code": {"()": "ringrelay.cli._RedactSecretQuery"}}
    config["loggers"]["uvicorn.access"]["filters"] = ["redact_code"]
    config["formatters"]["ringrelay"] = {
        "format": "%(asctime)s %(levelname)s %(name)s [%(process)d]: %(message)s"
    }
    config["handlers"]["ringrelay"] = {
        "class": "logging.StreamHandler",
        "formatter": "ringrelay",
        "stream": "ext://sys.stderr",
    }
    config["loggers"]["ringrelay"] = {
        "handlers": ["ringrelay"],
        "level": level.upper(),
        "propagate": False,
    }
    return config


def worker_app() -> FastAPI:
    """The app of one worker process (uvicorn factory): settings read again from the environment
    and `RINGRELAY_CONFIG`, which the supervisor's children inherit."""
    from ringrelay.app import create_app

    app = create_app(load_settings())
    # As a single `serve` does (cli.py): start-up allocations out of the collector's sight.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    return app


def serve_workers(
    settings: Settings,
    config_file: str | None,
    host: str,
    port: int,
    workers: int,
    access_log: bool,
) -> None:
    import uvicorn

    check_workers(settings, workers)
    if config_file:
        os.environ["RINGRELAY_CONFIG"] = os.path.abspath(config_file)
    uvicorn.run(
        FACTORY,
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_config=log_config(settings.log_level),
        log_level=settings.log_level.lower(),
        access_log=access_log,
        lifespan="on",
        timeout_graceful_shutdown=int(settings.webhook_deadline_seconds) + 2,
    )
