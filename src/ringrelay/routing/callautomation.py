"""Redirect and Reject through Call Automation, with Microsoft's SDK
(`azure-communication-callautomation`, async client).

One attempt per call of `redirect` / `reject`; the caller (routing/calls.py) retries transient
failures within the ring window with the same Repeatability-Request-ID and -First-Sent, so the
service executes a retried request once (REST spec, Azure/azure-rest-api-specs
`specification/communication/data-plane/CallAutomation/stable/2024-09-15/
communicationservicescallautomation.json`: "the client can make the request multiple times with
the same Repeatability-Request-Id ... without the server executing the request multiple times").
The SDK's own retry policy is off (`retry_total=0`) for that reason: it would retry past the
ring window and hide the attempts from the ledger.

Transport: one aiohttp session of ours, with the TLS context built once (RINGRELAY_ACS_CA_FILE
trusts a test CA). Passing `connection_verify=<path>` to the SDK instead would make azure-core
build a new SSLContext (and read the CA file) on every request
(`AioHttpTransport._build_ssl_config`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
import uuid
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any
from urllib.parse import urlsplit

from ringrelay.models import DeliveryStatus

log = logging.getLogger("ringrelay.callautomation")


@dataclass(frozen=True, slots=True)
class AcsConnection:
    endpoint: str  # https://<resource>.communication.azure.com
    access_key: str  # base64


def parse_acs_connection_string(value: str) -> AcsConnection:
    """`endpoint=https://<resource>.communication.azure.com/;accesskey=<base64>`: split on `;`
    then on the first `=`, keys case-insensitive (the SDK's `parse_connection_str`)."""
    import base64
    import binascii

    parts: dict[str, str] = {}
    for part in value.strip().split(";"):
        if part.strip():
            key, _, val = part.partition("=")
            parts[key.strip().lower()] = val.strip()
    endpoint = parts.get("endpoint", "")
    key = parts.get("accesskey", "")
    if not endpoint or not key:
        raise ValueError(
            "expected endpoint=https://<resource>.communication.azure.com/;accesskey=…"
        )
    url = urlsplit(endpoint)
    if url.scheme != "https" or not url.hostname:
        raise ValueError("endpoint must be https://<resource>.communication.azure.com/")
    try:
        base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("accesskey is not base64 (copy it from the resource's Keys)") from None
    return AcsConnection(f"https://{url.netloc}", key)


def repeatability_id(*parts: str) -> str:
    """A version-4-shaped UUID derived from the call and the action: every attempt, retry and
    instance sends the same id for the same action (the spec asks for a v4 UUID)."""
    digest = bytearray(hashlib.sha256("\x1f".join(parts).encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x40
    digest[8] = (digest[8] & 0x3F) | 0x80
    return str(uuid.UUID(bytes=bytes(digest)))


def rfc1123(when: float) -> str:
    """IMF-fixdate, as Repeatability-First-Sent wants (`Sun, 06 Nov 1994 08:49:37 GMT`)."""
    return formatdate(when, usegmt=True)


@dataclass(frozen=True, slots=True)
class ActionResult:
    status: DeliveryStatus  # ACCEPTED, REJECTED (4xx), CONFIG_ERROR (401/403), TRANSIENT
    reason: str
    http_status: int | None = None


def classify(exc: BaseException) -> ActionResult:
    """What a failed request means: 401/403 or a certificate that does not verify a
    configuration error (bad key, wrong resource, CA not trusted); another 4xx a refusal that a
    retry cannot change (call answered, ended, bad target); 408/429, 5xx or no answer
    transient."""
    from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError

    from ringrelay.providers import certificate_error

    # azure-core keeps aiohttp's error as `inner_exception`.
    cert = certificate_error(exc)
    inner = getattr(exc, "inner_exception", None)
    if cert is None and isinstance(inner, BaseException):
        cert = certificate_error(inner)
    if cert is not None:
        # aiohttp's ClientConnectorCertificateError is an ssl.CertificateError holding ssl's.
        original = getattr(cert, "certificate_error", cert)
        detail = getattr(original, "verify_message", None) or str(original)
        return ActionResult(
            DeliveryStatus.CONFIG_ERROR,
            f"TLS certificate of Call Automation not trusted ({detail}): "
            "check the endpoint in RINGRELAY_ACS_CONNECTION_STRING, or trust the CA that signed "
            "it with RINGRELAY_ACS_CA_FILE",
        )
    if isinstance(exc, HttpResponseError) and exc.status_code is not None:
        code = int(exc.status_code)
        error = getattr(exc, "error", None)
        detail = getattr(error, "message", None) or exc.reason or ""
        text = f"HTTP {code}" + (f": {detail}" if detail else "")
        if code in (401, 403):
            return ActionResult(
                DeliveryStatus.CONFIG_ERROR,
                f"Call Automation refused our credentials ({text}): check "
                "RINGRELAY_ACS_CONNECTION_STRING",
                code,
            )
        if code in (408, 429) or code >= 500:
            return ActionResult(DeliveryStatus.TRANSIENT, text, code)
        return ActionResult(DeliveryStatus.REJECTED, text, code)
    if isinstance(exc, ServiceRequestError | ServiceResponseError | asyncio.TimeoutError | OSError):
        return ActionResult(DeliveryStatus.TRANSIENT, f"no answer: {type(exc).__name__}: {exc}")
    return ActionResult(DeliveryStatus.TRANSIENT, f"{type(exc).__name__}: {exc}")


def sdk_identifier(raw_id: str) -> Any:
    """The SDK's identifier object for a raw id (phone number, ACS user, Teams user)."""
    from azure.communication.callautomation import (
        CommunicationUserIdentifier,
        MicrosoftTeamsUserIdentifier,
        PhoneNumberIdentifier,
        UnknownIdentifier,
    )

    if raw_id.startswith("4:"):
        return PhoneNumberIdentifier(raw_id[2:], raw_id=raw_id)
    prefix, _, suffix = raw_id.rpartition(":")
    if prefix in ("8:acs", "8:gcch-acs", "8:dod-acs", "8:spool"):
        return CommunicationUserIdentifier(raw_id, raw_id=raw_id)
    clouds = {"8:orgid": "PUBLIC", "8:dod": "DOD", "8:gcch": "GCCH"}
    if prefix in clouds:
        return MicrosoftTeamsUserIdentifier(user_id=suffix, cloud=clouds[prefix], raw_id=raw_id)
    if prefix == "8:teamsvisitor":
        return MicrosoftTeamsUserIdentifier(user_id=suffix, is_anonymous=True, raw_id=raw_id)
    return UnknownIdentifier(raw_id)


class CallAutomation:
    """The SDK's async CallAutomationClient over a session of ours; started with the service."""

    def __init__(
        self,
        *,
        connection_string: str | None = None,
        endpoint: str | None = None,
        ca_file: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        if connection_string is None and endpoint is None:
            raise ValueError("Call Automation needs a connection string or an endpoint")
        self._connection_string = connection_string
        self._endpoint = endpoint
        self.ca_file = ca_file
        self.timeout = timeout
        self.endpoint = (
            parse_acs_connection_string(connection_string).endpoint
            if connection_string
            else str(endpoint)
        )
        self._client: Any = None
        self._session: Any = None
        self._credential: Any = None

    @property
    def description(self) -> str:
        return f"Call Automation ({urlsplit(self.endpoint).netloc})"

    async def start(self) -> None:
        import aiohttp

        # azure-core logs every request and answer with its headers at INFO: one redirect is
        # not worth six log lines (Authorization is redacted there, the context is not logged).
        logging.getLogger("azure.core.pipeline.policies.http_logging_policy").setLevel(
            logging.WARNING
        )
        from azure.communication.callautomation.aio import CallAutomationClient
        from azure.core.pipeline.transport import AioHttpTransport

        context = ssl.create_default_context(cafile=self.ca_file) if self.ca_file else True
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=context, limit=100, keepalive_timeout=60)
        )
        transport = AioHttpTransport(session=self._session, session_owner=False)
        options: dict[str, Any] = {
            "transport": transport,
            "retry_total": 0,
            "connection_timeout": self.timeout,
            "read_timeout": self.timeout,
        }
        if self._connection_string:
            self._client = CallAutomationClient.from_connection_string(
                self._connection_string, **options
            )
        else:
            try:
                from azure.identity.aio import DefaultAzureCredential  # type: ignore[import-untyped, import-not-found, unused-ignore]
            except ImportError:
                raise RuntimeError(
                    "RINGRELAY_ACS_ENDPOINT without a connection string needs azure-identity "
                    "(pip install azure-identity) for an Entra credential"
                ) from None
            self._credential = DefaultAzureCredential()
            self._client = CallAutomationClient(self.endpoint, self._credential, **options)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._credential is not None:
            await self._credential.close()
            self._credential = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _headers(self, request_id: str, first_sent: float) -> dict[str, str]:
        return {
            "Repeatability-Request-ID": request_id,
            "Repeatability-First-Sent": rfc1123(first_sent),
        }

    async def redirect(
        self, context: str, target: str, request_id: str, first_sent: float, budget: float
    ) -> ActionResult:
        return await self._call(
            self._client.redirect_call(
                context,
                sdk_identifier(target),
                headers=self._headers(request_id, first_sent),
            ),
            budget,
        )

    async def reject(
        self, context: str, reason: str, request_id: str, first_sent: float, budget: float
    ) -> ActionResult:
        return await self._call(
            self._client.reject_call(
                context,
                call_reject_reason=reason,
                headers=self._headers(request_id, first_sent),
            ),
            budget,
        )

    async def _call(self, request: Any, budget: float) -> ActionResult:
        if self._client is None:
            request.close()
            return ActionResult(DeliveryStatus.CONFIG_ERROR, "Call Automation client not started")
        try:
            async with asyncio.timeout(max(0.05, min(budget, self.timeout))):
                await request
        except Exception as exc:
            return classify(exc)
        return ActionResult(DeliveryStatus.ACCEPTED, "", 204)
