"""`ringrelay import sample-mongo FILE`: the registrar collection of Microsoft's sample
(Azure-Samples/azure-communication-services-calling-event-grid, ACSCallingNativeRegistrarLite),
exported with `mongoexport` (JSON lines, or `--jsonArray`), into ringrelay's registry.

The sample's document (Models/ACSUserRegistrationInfo.cs): the callee's ACS identity is the
document's `_id` (`acsMri` is a view of it, not stored; accepted when present), and
`deviceInfos` is a list of `{deviceUUID, deviceToken, platform}`, `platform` being one of the
sample's enum names (`none, android, apple, gcm, windows, windowsphone, adm, baidu`) as the app
sent it. Every device is checked as the registration API checks it (registry.build_registration
and the running configuration's routes); a device that fails is refused with the reason, the
others are stored. Importing the same file again refreshes the same rows (idempotent). The file
is streamed: memory is one read chunk plus one batch, whatever the file's size."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ringrelay.api.compat import SAMPLE_PLATFORMS
from ringrelay.delivery.router import ProviderRouter
from ringrelay.models import Platform, PushKind, Registration
from ringrelay.registry import RegistrationError, build_registration
from ringrelay.store import Store

log = logging.getLogger("ringrelay.import")

# The sample's enum names that ringrelay cannot push to, with why (the others: SAMPLE_PLATFORMS).
RETIRED_PLATFORMS = {
    "windowsphone": "Microsoft Push Notification Service (Windows Phone) is retired",
    "none": "the sample's placeholder platform 'none'",
}
EXAMPLES_KEPT = 20  # refusals listed in full in the report; the rest are counted by reason
BATCH_ATTEMPTS = 3  # a batch is idempotent: one that failed (e.g. a dropped connection) is retried


@dataclass
class ImportReport:
    documents: int = 0
    imported: int = 0  # new registrations
    refreshed: int = 0  # existed already (a re-import, or the same device twice in the file)
    refused: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def refuse(self, where: str, reason: str) -> None:
        self.refused += 1
        self.reasons[reason] += 1
        if len(self.examples) < EXAMPLES_KEPT:
            self.examples.append(f"{where}: {reason}")

    def lines(self) -> list[str]:
        rate = (self.imported + self.refreshed) / self.seconds if self.seconds else 0.0
        out = [
            f"documents read: {self.documents}",
            f"imported:       {self.imported} new registration(s)",
            f"refreshed:      {self.refreshed} already present (lifetime renewed)",
            f"refused:        {self.refused}",
            f"time:           {self.seconds:.1f} s ({rate:,.0f} registrations/s)",
        ]
        if self.refused:
            out.append("refused, by reason:")
            out += [f"  {n:>8}  {reason}" for reason, n in self.reasons.most_common()]
            out.append(f"first {len(self.examples)} refusal(s):")
            out += [f"  {line}" for line in self.examples]
        return out


def _platform(value: object) -> Platform | str:
    """The sample's platform name -> ours, or the reason it is refused."""
    if not isinstance(value, str) or not value:
        return "platform: missing"
    name = value.strip().lower()
    if name in RETIRED_PLATFORMS:
        return f"platform: {RETIRED_PLATFORMS[name]}"
    platform = SAMPLE_PLATFORMS.get(name)
    if platform is None:
        return f"platform: {value[:40]!r} is not one of {', '.join(SAMPLE_PLATFORMS)}"
    return platform


def _identity(doc: dict[str, Any]) -> str | None:
    given = [v for v in (doc.get("_id"), doc.get("acsMri")) if v is not None]
    # A string, and the same in both places when both are there (an ObjectId `{"$oid": …}`
    # is not an identity: the sample always keys documents by the ACS identity).
    if not given or not all(isinstance(v, str) and v == given[0] for v in given):
        return None
    return str(given[0])


def registrations_of(
    index: int,
    doc: object,
    router: ProviderRouter,
    ttl_seconds: int,
    now: float,
    report: ImportReport,
) -> Iterator[Registration]:
    """The valid registrations of one document; the refused ones go to the report."""
    where = f"document {index + 1}"
    if not isinstance(doc, dict):
        report.refuse(where, "not a JSON object")
        return
    identity = _identity(doc)
    if identity is None:
        report.refuse(where, "_id/acsMri: missing, not a string, or the two differ")
        return
    where = f"document {index + 1} ({identity})"
    infos = doc.get("deviceInfos")
    if not isinstance(infos, list) or not infos:
        report.refuse(where, "deviceInfos: missing or empty")
        return
    for i, info in enumerate(infos):
        at = f"{where} deviceInfos[{i}]"
        if not isinstance(info, dict):
            report.refuse(at, "not an object")
            continue
        platform = _platform(info.get("platform"))
        if not isinstance(platform, Platform):  # (Platform is a str too: test for it)
            report.refuse(at, platform)
            continue
        device_id, token = info.get("deviceUUID"), info.get("deviceToken")
        if not isinstance(device_id, str) or not isinstance(token, str):
            report.refuse(at, "deviceUUID and deviceToken: must be strings")
            continue
        problem = router.registration_error(platform, None)
        if problem is not None:
            report.refuse(at, f"platform: {problem[1]}")
            continue
        try:
            yield build_registration(
                identity, device_id, platform, token, PushKind.VOIP, None, ttl_seconds, now
            )
        except RegistrationError as exc:
            names = {"identity": "_id", "device_id": "deviceUUID", "token": "deviceToken"}
            report.refuse(at, f"{names.get(exc.field, exc.field)}: {exc.message}")


async def import_documents(
    docs: Iterable[object],
    store: Store,
    router: ProviderRouter,
    ttl_seconds: int,
    *,
    batch_size: int = 1000,
    progress: Callable[[ImportReport], None] | None = None,
) -> ImportReport:
    """Validate and store every document's devices, `batch_size` registrations per transaction."""
    report = ImportReport()
    started = time.monotonic()
    now = time.time()
    batch: list[Registration] = []
    keys: set[tuple[str, str]] = set()
    tokens: set[tuple[Platform, str]] = set()

    async def store_batch() -> list[bool]:
        for attempt in range(1, BATCH_ATTEMPTS + 1):
            try:
                return await store.upsert_registrations(batch)
            except Exception as exc:
                if attempt == BATCH_ATTEMPTS:
                    raise
                log.warning("storing a batch failed (%s); retrying it", type(exc).__name__)
                await asyncio.sleep(0.5 * attempt)
        raise AssertionError("unreachable")

    async def flush() -> None:
        if batch:
            for created in await store_batch():
                if created:
                    report.imported += 1
                else:
                    report.refreshed += 1
            batch.clear()
            keys.clear()
            tokens.clear()
        if progress is not None:
            progress(report)

    for index, doc in enumerate(docs):
        report.documents += 1
        for reg in registrations_of(index, doc, router, ttl_seconds, now, report):
            key, token = (reg.identity, reg.device_id), (reg.platform, reg.token)
            if key in keys or token in tokens:
                await flush()  # a batch holds each key and token once (Store contract)
            batch.append(reg)
            keys.add(key)
            tokens.add(token)
            if len(batch) >= batch_size:
                await flush()
    await flush()
    report.seconds = time.monotonic() - started
    return report
