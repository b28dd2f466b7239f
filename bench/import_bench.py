"""`ringrelay import sample-mongo` of a large mongoexport: time and peak memory, on PostgreSQL.

    python bench/import_bench.py                       # 100,000 then 1,000,000 registrations
    python bench/import_bench.py --sizes 1000000

The file is made here in the sample's document shape (`{_id: <ACS identity>, deviceInfos:
[{deviceUUID, deviceToken, platform}]}`, JSON lines as mongoexport writes by default), two
devices per identity (an iPhone, an Android phone). The import runs as a user runs it (the CLI, as
a process); its peak resident memory comes from the kernel (getrusage of the child). Two sizes in
one run show whether memory grows with the file (it should not: the file is streamed).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson

PG_URL = os.environ.get("RINGRELAY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def write_export(path: Path, registrations: int) -> int:
    with path.open("wb") as f:
        for n in range(registrations // 2):
            doc = {
                "_id": f"8:acs:98e4cbef-70e7-4733-8594-063c4a72d711_{n:08d}",
                "deviceInfos": [
                    {"deviceUUID": f"ios-{n}", "deviceToken": f"{n:016x}" * 4, "platform": "apple"},
                    {
                        "deviceUUID": f"android-{n}",
                        "deviceToken": f"fcm:{n:012d}-token_A1b2C3d4",
                        "platform": "android",
                    },
                ],
            }
            f.write(orjson.dumps(doc) + b"\n")
    return path.stat().st_size


async def make_schema(name: str, drop: bool = False) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_URL)
    try:
        sql = f'DROP SCHEMA IF EXISTS "{name}" CASCADE' if drop else f'CREATE SCHEMA "{name}"'
        await conn.execute(sql, timeout=120)
    finally:
        await conn.close()


def run_import(file: Path, url: str) -> tuple[float, float, str]:
    """(seconds, peak RSS in MB, the report) of one import process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RINGRELAY_")}
    env["RINGRELAY_DATABASE_URL"] = url
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ringrelay", "import", "sample-mongo", str(file), "--no-progress"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out, _ = proc.communicate()
    seconds = time.monotonic() - t0
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KB -> MB (Linux)
    if proc.returncode != 0:
        raise RuntimeError(f"import failed ({proc.returncode}):\n{out}")
    return seconds, rss, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    a = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ringrelay-import-bench-"))
    print(f"{os.cpu_count()} cores; load average at start {os.getloadavg()[0]:.1f}", flush=True)
    for size in a.sizes:
        file = work / f"registrar-{size}.jsonl"
        t0 = time.monotonic()
        nbytes = write_export(file, size)
        print(
            f"{size:,} registrations: {nbytes / 1e6:.0f} MB of JSON lines written in "
            f"{time.monotonic() - t0:.1f} s",
            flush=True,
        )
        schema = f"rr_bench_{uuid.uuid4().hex[:10]}"
        asyncio.run(make_schema(schema))
        try:
            # RUSAGE_CHILDREN is the largest child so far: sizes run smallest first.
            # Named: the fault tests of a suite sharing this server kill unnamed connections.
            url = f"{PG_URL}?search_path={schema}&application_name=ringrelay-import-bench"
            seconds, rss, out = run_import(file, url)
        finally:
            asyncio.run(make_schema(schema, drop=True))
            file.unlink()
        stored = next(x for x in out.splitlines() if "imported:" in x).split(":", 1)[1].strip()
        print(
            f"  import: {seconds:.1f} s, {size / seconds:,.0f} registrations/s, peak RSS "
            f"{rss:.0f} MB (largest import process so far); {stored}; load average now "
            f"{os.getloadavg()[0]:.1f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
