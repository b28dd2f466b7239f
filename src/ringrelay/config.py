"""Settings: the environment (`RINGRELAY_*`, and Microsoft's sample names for Notification Hubs)
over an optional TOML file over defaults."""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from ringrelay.models import Platform
from ringrelay.routing.rules import Rule, check_unique_names

# Registration lifetime bounds: the ACS calling SDK's own limits (learn.microsoft.com
# azure/communication-services/how-tos/calling-sdk/push-notifications: 5 min ... 180 days).
MIN_TTL_SECONDS = 300
MAX_TTL_SECONDS = 15_552_000


class ConfigError(Exception):
    """A setting is missing or malformed; the message names it."""


@dataclass(frozen=True, slots=True)
class NotificationHubsConnection:
    endpoint: str  # https://<namespace>.servicebus.windows.net/
    key_name: str
    key: str


def parse_connection_string(value: str) -> NotificationHubsConnection:
    """`Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=...;SharedAccessKey=...`.

    Split on `;` then on the first `=`, keys case-insensitive, as the Azure SDK parser does
    (azure-servicebus `_parse_conn_str`).

    Errors name a segment by its position, never by its text: a segment without `=` may well
    be the key itself.
    """
    parts: dict[str, str] = {}
    for position, part in enumerate(value.strip().split(";"), start=1):
        if not part.strip():
            continue
        key, sep, val = part.partition("=")
        if not sep:
            raise ValueError(
                f"segment {position} (of the ';'-separated Name=value segments) has no '='"
            )
        parts[key.strip().lower()] = val.strip()
    missing = [
        name
        for name in ("Endpoint", "SharedAccessKeyName", "SharedAccessKey")
        if not parts.get(name.lower())
    ]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    endpoint = urlsplit(parts["endpoint"])
    if endpoint.scheme not in ("sb", "https", "http") or not endpoint.hostname:
        raise ValueError("Endpoint must look like sb://<namespace>.servicebus.windows.net/")
    scheme = "http" if endpoint.scheme == "http" else "https"
    return NotificationHubsConnection(
        endpoint=f"{scheme}://{endpoint.netloc}/",
        key_name=parts["sharedaccesskeyname"],
        key=parts["sharedaccesskey"],
    )


Transport = Literal["apns", "fcm", "notificationhubs", "sandbox"]


def _existing_file(value: Path | None) -> Path | None:
    """A CA or key file must exist when the setting is read, not at the first push."""
    if value is not None and not value.is_file():
        raise ValueError(f"no such file {value}")
    return value


class ApnsApp(BaseModel):
    """One iOS app pushed straight to APNs with a token-based (.p8) key. TOML: `[[apns]]`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    app_id: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9._\-]{1,255}$"
    )  # default: bundle_id
    # The app's bundle id; VoIP pushes go to the topic `<bundle_id>.voip`.
    bundle_id: str = Field(pattern=r"^[A-Za-z0-9\-]+(\.[A-Za-z0-9\-]+)+$")
    # Apple's Team ID and Key ID are 10-character strings (developer.apple.com, "Establishing a
    # token-based connection to APNs").
    team_id: str = Field(pattern=r"^[A-Z0-9]{10}$")
    key_id: str = Field(pattern=r"^[A-Z0-9]{10}$")
    key_file: Path
    environment: Literal["production", "sandbox"] = "production"
    endpoint: str | None = None  # tests and fakes only: host:port or https://host:port
    ca_file: Path | None = None  # tests and fakes only: trust this CA
    timeout_seconds: float = Field(default=5.0, gt=0, le=30)
    max_connections: int = Field(default=8, ge=1, le=100)
    max_in_flight: int = Field(default=1000, ge=1, le=1_000_000)

    @property
    def name(self) -> str:
        return self.app_id or self.bundle_id

    _check_ca = field_validator("ca_file")(_existing_file)

    @field_validator("key_file")
    @classmethod
    def _check_key(cls, value: Path) -> Path:
        from ringrelay.providers.apns import load_signing_key

        if not value.is_file():
            raise ValueError(f"no such file {value}")
        try:
            load_signing_key(value)
        except ValueError as exc:
            raise ValueError(f"{value}: {exc}") from None
        return value


class FcmApp(BaseModel):
    """One Firebase project pushed straight through FCM HTTP v1. TOML: `[[fcm]]`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    app_id: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9._\-]{1,255}$"
    )  # default: project id
    service_account_file: Path
    endpoint: str | None = Field(
        default=None, pattern=r"^https://[^/?#]+/?$"
    )  # tests and fakes only: https://host:port (HTTP/2 over TLS)
    ca_file: Path | None = None  # tests and fakes only: trust this CA (FCM and token endpoint)
    timeout_seconds: float = Field(default=5.0, gt=0, le=30)
    # HTTP/2 connections: each carries up to 32 pushes at once (Google allows 100 streams).
    max_connections: int = Field(default=8, ge=1, le=100)
    max_in_flight: int = Field(default=1000, ge=1, le=1_000_000)

    @property
    def project_id(self) -> str:
        from ringrelay.providers.fcm import read_service_account

        return str(read_service_account(self.service_account_file)["project_id"])

    @property
    def name(self) -> str:
        return self.app_id or self.project_id

    _check_ca = field_validator("ca_file")(_existing_file)

    @field_validator("service_account_file")
    @classmethod
    def _check_account(cls, value: Path) -> Path:
        from ringrelay.providers.fcm import read_service_account

        if not value.is_file():
            raise ValueError(f"no such file {value}")
        try:
            read_service_account(value)
        except ValueError as exc:
            raise ValueError(f"{value}: {exc}") from None
        return value


def _names(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="RINGRELAY_",
        extra="ignore",
        populate_by_name=True,
        case_sensitive=False,
    )

    database_url: str = "sqlite:///./ringrelay.db"
    webhook_secret: SecretStr | None = None
    ring_window_seconds: int = Field(default=45, ge=5, le=3600)
    # 30 days: FCM calls a token stale after a month without contact (firebase manage-tokens).
    default_ttl_seconds: int = Field(default=30 * 86400, ge=MIN_TTL_SECONDS, le=MAX_TTL_SECONDS)
    # Event Grid waits 30 s for an answer (learn.microsoft.com azure/event-grid/delivery-and-retry);
    # stop retrying in-process early enough to answer before that.
    webhook_deadline_seconds: float = Field(default=20.0, gt=0, le=28)
    # Deliveries handled at once per instance; past it the webhook answers 503 at once (Event
    # Grid retries) instead of queueing work that would be answered too late for a ringing phone.
    webhook_max_concurrent: int = Field(default=512, ge=1, le=100_000)
    # Event Grid delivers at most 5,000 events per batch ("Max events per batch ... must be
    # between 1 and 5,000", and 1 by default: learn.microsoft.com azure/event-grid/
    # delivery-and-retry, "Batched event delivery"). More is not Event Grid: 413 before any work.
    max_events_per_delivery: int = Field(default=5000, ge=1, le=5000)
    # Slow or idle clients (httpserver.py): a request's headers must arrive within this long of
    # the connection opening (or of the previous answer on a kept-alive connection), its body
    # within body_timeout_seconds of the headers; else 408 and the connection is closed.
    header_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    body_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    # Open client connections per instance; past it the connection that has waited longest for
    # its request is closed to make room (503 when every connection is busy with a request).
    max_connections: int = Field(default=2048, ge=8, le=1_000_000)
    # Bounded: the body is parsed on the event loop (1 MiB of `{}` takes ~50 ms to refuse).
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024, le=16 * 1024 * 1024)
    delivery: Literal["auto", "sandbox", "notificationhubs"] = "auto"
    sandbox_capacity: int = Field(default=1000, ge=1, le=100_000)
    purge_interval_seconds: float = Field(default=60.0, gt=0)
    ledger_retention_seconds: int = Field(default=7 * 86400, ge=60)
    log_level: str = "INFO"
    # "json": one JSON object per line with callId/eventId/deviceId (for log pipelines).
    log_format: Literal["text", "json"] = "text"

    # Notification Hubs: Microsoft's sample/tutorial app-setting names are accepted as they are.
    nh_connection_string: SecretStr | None = Field(
        default=None,
        validation_alias=_names(
            "RINGRELAY_NH_CONNECTION_STRING",
            "ANHHubConnectionString",
            "ANH_Hub_Connection_String",
            "nh_connection_string",
        ),
    )
    nh_hub_name: str | None = Field(
        default=None,
        validation_alias=_names(
            "RINGRELAY_NH_HUB_NAME", "ANHHubName", "ANH_Hub_Name", "nh_hub_name"
        ),
    )
    nh_hub_url: str | None = Field(
        default=None,
        validation_alias=_names("RINGRELAY_NH_HUB_URL", "ANHHubUrl", "ANH_Hub_URL", "nh_hub_url"),
    )
    # 2020-06 is what the Azure JS SDK uses for every data-plane call, fcmv1 included
    # (azure-sdk-for-js notification-hubs clientContext.ts); the sample's 2015-01 predates fcmv1.
    nh_api_version: str = Field(
        default="2020-06",
        validation_alias=_names(
            "RINGRELAY_NH_API_VERSION", "ANHHubApiVersion", "ANH_Hub_Api_Version", "nh_api_version"
        ),
    )
    nh_ca_file: Path | None = None  # tests and fakes only: trust this CA for the hub's TLS
    nh_timeout_seconds: float = Field(default=5.0, gt=0, le=30)
    nh_sas_ttl_seconds: int = Field(default=3600, ge=300, le=86400)
    nh_max_connections: int = Field(default=100, ge=1, le=10_000)
    nh_max_in_flight: int = Field(default=1000, ge=1, le=1_000_000)

    # Direct delivery: any number of apps per platform; a registration names its app (app_id)
    # unless its platform has only one.
    apns: list[ApnsApp] = Field(default_factory=list)
    fcm: list[FcmApp] = Field(default_factory=list)
    # Which transport serves which platform, over the default (direct where configured, else
    # Notification Hubs where configured, else the sandbox when nothing is configured at all).
    routes: dict[Platform, Transport] = Field(default_factory=dict)

    # Whether registrar callers must authenticate (a user's JWT or a backend's API key). Decided
    # at start-up from the configuration, never from what the database holds: unset, it is on
    # when a JWT issuer is configured or `serve` listens beyond loopback, off on loopback (the
    # quickstart). See registrar_auth_required.
    auth_required: bool | None = None
    # Registrar authentication: bearer JWTs from the app's identity provider.
    auth_issuer: str | None = None
    auth_audience: str | None = None
    auth_jwks_url: str | None = None
    auth_public_key_file: Path | None = None
    auth_identity_claim: str = "sub"  # the claim carrying the caller's ACS rawId
    auth_algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256"])
    auth_jwks_ca_file: Path | None = None  # tests only: trust this CA for the JWKS URL
    # An unknown `kid` refetches the JWKS (key rotation), at most this often: a flood of forged
    # kids must not turn into a flood of requests to the identity provider.
    auth_jwks_min_refresh_seconds: float = Field(default=10.0, ge=0)

    # Webhook authentication: a second secret accepted while rotating, and Entra ID tokens.
    webhook_secret_next: SecretStr | None = None
    eventgrid_tenant_id: str | None = None
    eventgrid_audience: str | None = None
    eventgrid_jwks_url: str | None = None  # default: the tenant's Entra JWKS

    # Registrar abuse limits (per instance); 0 disables a limit.
    rate_limit_per_identity: int = Field(default=60, ge=0)  # requests per minute
    rate_limit_per_client: int = Field(default=600, ge=0)  # requests per minute per address
    max_request_bytes: int = Field(default=64 * 1024, ge=1024)  # every route but the webhook

    # Call routing (README, "Call routing"): rules evaluated in order for every IncomingCall.
    rules: list[Rule] = Field(default_factory=list)
    # Call Automation, for redirect / reject: `endpoint=https://<resource>.communication.azure.com/;
    # accesskey=<base64>` (the Azure portal's "Keys" blade), or an endpoint with an Entra
    # credential (azure-identity's DefaultAzureCredential, when that package is installed).
    acs_connection_string: SecretStr | None = None
    acs_endpoint: str | None = None
    acs_ca_file: Path | None = None  # tests and fakes only: trust this CA
    acs_timeout_seconds: float = Field(default=5.0, gt=0, le=30)
    # A call is redirected at most this many times (per correlationId): the loop guard.
    max_redirects: int = Field(default=1, ge=0, le=10)

    # Chat pushes (ringrelay.chat, README "Chat pushes").
    # What a visible chat notification says: the text travels through Apple's/Google's servers.
    chat_preview: Literal["full", "sender", "none"] = "full"
    # Deliver a chat push no later than this after the message (APNs expiration, FCM ttl; FCM
    # keeps a message at most 28 days).
    chat_ttl_seconds: int = Field(default=3600, ge=60, le=28 * 86400)
    # Messages of one thread within this window share one notification entry with a count; 0 off.
    chat_coalesce_seconds: float = Field(default=0.0, ge=0, le=3600)
    # "X added you to a chat" for ChatThreadCreatedWithUser / ChatParticipantAddedToThreadWithUser.
    chat_notify_added: bool = False
    # Seals the apps' chat keys at rest (AES-256-GCM): base64 of 32 bytes. Without it, `sdk`
    # registrations are refused.
    chat_key_encryption_key: SecretStr | None = None

    @property
    def registrar_auth_enabled(self) -> bool:
        """A JWT issuer is configured (users can authenticate)."""
        return self.auth_issuer is not None

    def registrar_auth_required(self, *, beyond_loopback: bool = False) -> bool:
        """RINGRELAY_AUTH_REQUIRED when set; otherwise on with a JWT issuer, or when the service
        listens beyond loopback (`serve` passes that; `--insecure` opts out of it)."""
        if self.auth_required is not None:
            return self.auth_required
        return self.registrar_auth_enabled or beyond_loopback

    @model_validator(mode="after")
    def _check_auth(self) -> Settings:
        from ringrelay.auth.tokens import check_algorithms

        if self.auth_issuer is not None:
            if not self.auth_audience:
                raise ValueError("RINGRELAY_AUTH_AUDIENCE: required with RINGRELAY_AUTH_ISSUER")
            if bool(self.auth_jwks_url) == bool(self.auth_public_key_file):
                raise ValueError(
                    "RINGRELAY_AUTH_JWKS_URL or RINGRELAY_AUTH_PUBLIC_KEY_FILE: give exactly one"
                )
            if self.auth_public_key_file and not self.auth_public_key_file.is_file():
                raise ValueError(
                    f"RINGRELAY_AUTH_PUBLIC_KEY_FILE: no such file {self.auth_public_key_file}"
                )
            try:
                check_algorithms(self.auth_algorithms)
            except ValueError as exc:
                raise ValueError(f"RINGRELAY_AUTH_ALGORITHMS: {exc}") from None
            if self.auth_required is False:
                raise ValueError(
                    "RINGRELAY_AUTH_REQUIRED: false contradicts RINGRELAY_AUTH_ISSUER (with an "
                    "issuer configured, callers authenticate); unset one of them"
                )
        elif self.auth_audience or self.auth_jwks_url or self.auth_public_key_file:
            raise ValueError("RINGRELAY_AUTH_ISSUER: required when other AUTH settings are set")
        if bool(self.eventgrid_tenant_id) != bool(self.eventgrid_audience):
            raise ValueError(
                "RINGRELAY_EVENTGRID_TENANT_ID and RINGRELAY_EVENTGRID_AUDIENCE: give both"
            )
        return self

    @model_validator(mode="after")
    def _check_routing(self) -> Settings:
        check_unique_names(self.rules)
        if not self.call_automation_configured:
            for i, rule in enumerate(self.rules):
                if rule.action in ("redirect", "reject"):
                    raise ValueError(
                        f"rules[{i}] (name {rule.name!r}).action: {rule.action} needs Call "
                        "Automation: set RINGRELAY_ACS_CONNECTION_STRING"
                    )
        if self.acs_connection_string is not None:
            from ringrelay.routing.callautomation import parse_acs_connection_string

            try:
                parse_acs_connection_string(self.acs_connection_string.get_secret_value())
            except ValueError as exc:
                raise ValueError(f"RINGRELAY_ACS_CONNECTION_STRING: {exc}") from None
        if self.acs_endpoint is not None and not self.acs_endpoint.startswith("https://"):
            raise ValueError(
                "RINGRELAY_ACS_ENDPOINT: expected https://<resource>.communication.azure.com"
            )
        if self.acs_ca_file is not None and not self.acs_ca_file.is_file():
            raise ValueError(f"RINGRELAY_ACS_CA_FILE: no such file {self.acs_ca_file}")
        return self

    @property
    def call_automation_configured(self) -> bool:
        return self.acs_connection_string is not None or self.acs_endpoint is not None

    @field_validator("chat_key_encryption_key")
    @classmethod
    def _check_chat_key_encryption_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        from ringrelay.chat.keys import ChatKeyVaultError, parse_master_key

        try:
            parse_master_key(value.get_secret_value())
        except ChatKeyVaultError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("nh_connection_string")
    @classmethod
    def _check_connection_string(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and value.get_secret_value().strip():
            parse_connection_string(value.get_secret_value())
            return value
        return None

    _check_files = field_validator("nh_ca_file", "auth_jwks_ca_file")(_existing_file)

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        levels = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
        if value.upper() not in levels:
            raise ValueError(f"expected one of {', '.join(levels)}, not {value!r}")
        return value.upper()

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        if not value.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError("expected sqlite:///path or postgresql://user@host:port/database")
        path = value.removeprefix("sqlite:///")
        if value.startswith("sqlite:///") and path != ":memory:":
            # A typo in the path must not quietly create a fresh, empty registry somewhere else.
            folder = Path(path).parent
            if not folder.is_dir():
                raise ValueError(f"the folder {folder} does not exist: create it first")
        return value

    @field_validator("nh_hub_url")
    @classmethod
    def _check_hub_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        parts = urlsplit(value.strip())
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError("expected https://<namespace>.servicebus.windows.net/<hub>/messages/")
        return value.strip()

    @model_validator(mode="after")
    def _check_notification_hubs(self) -> Settings:
        if self.delivery == "notificationhubs" and self.nh_connection_string is None:
            raise ValueError(
                "nh_connection_string: required when delivery = notificationhubs "
                "(RINGRELAY_NH_CONNECTION_STRING or ANHHubConnectionString)"
            )
        if self.nh_connection_string is not None and not (self.nh_hub_name or self.nh_hub_url):
            raise ValueError(
                "nh_hub_name: required with a Notification Hubs connection string "
                "(RINGRELAY_NH_HUB_NAME or ANHHubName, or give ANHHubUrl)"
            )
        return self

    @model_validator(mode="after")
    def _check_direct(self) -> Settings:
        for platform, apps in ((Platform.APNS, self.apns), (Platform.FCM, self.fcm)):
            names = [app.name for app in apps]
            duplicate = {n for n in names if names.count(n) > 1}
            if duplicate:
                raise ValueError(
                    f"{platform.value}: app_id {sorted(duplicate)[0]!r} configured twice "
                    "(give each app its own app_id)"
                )
        for platform, transport in self.routes.items():
            if transport == "apns" and (platform is not Platform.APNS or not self.apns):
                raise ValueError(
                    f"routes.{platform.value}: 'apns' needs platform apns and [[apns]]"
                )
            if transport == "fcm" and (platform is not Platform.FCM or not self.fcm):
                raise ValueError(f"routes.{platform.value}: 'fcm' serves fcm, with [[fcm]]")
            if transport == "notificationhubs" and self.nh_connection_string is None:
                raise ValueError(
                    f"routes.{platform.value}: 'notificationhubs' needs a connection string"
                )
        return self

    # --- derived ---------------------------------------------------------------------------

    def transport_routes(self) -> dict[Platform, Transport]:
        """Which transport serves each platform; a platform missing here cannot be registered."""
        if self.delivery == "sandbox":
            return {p: "sandbox" for p in Platform}
        routes: dict[Platform, Transport] = {}
        if self.delivery_backend == "notificationhubs":
            routes = {p: "notificationhubs" for p in Platform}
        elif not (self.apns or self.fcm):
            routes = {p: "sandbox" for p in Platform}
        if self.apns:
            routes[Platform.APNS] = "apns"
        if self.fcm:
            routes[Platform.FCM] = "fcm"
        routes.update(self.routes)
        return routes

    @property
    def delivery_backend(self) -> Literal["sandbox", "notificationhubs"]:
        if self.delivery == "auto":
            return "notificationhubs" if self.nh_connection_string is not None else "sandbox"
        return self.delivery

    @property
    def sqlite_path(self) -> str:
        return self.database_url.removeprefix("sqlite:///")

    def nh_connection(self) -> NotificationHubsConnection:
        assert self.nh_connection_string is not None
        return parse_connection_string(self.nh_connection_string.get_secret_value())

    def nh_messages_url(self) -> str:
        """`https://{namespace}.servicebus.windows.net/{hub}/messages/` (the sample's ANHHubUrl)."""
        if self.nh_hub_url:
            url = self.nh_hub_url.split("?", 1)[0]
            return url if url.endswith("/") else url + "/"
        return f"{self.nh_connection().endpoint}{self.nh_hub_name}/messages/"

    def nh_resource_uri(self) -> str:
        """The hub URI the SAS token is scoped to: the connection string's endpoint + the hub
        name, as Microsoft's ACS sample does (`GenerateToken(connectionString, hubName)`,
        ../shared/notes/protocols.md §2.2). Not the messages URL: ANHHubUrl may reach the hub
        through a proxy or a private endpoint, whose address the hub does not answer to. With
        only ANHHubUrl given, the hub name is the segment before its `/messages/`."""
        hub = self.nh_hub_name
        if not hub:
            segments = urlsplit(self.nh_messages_url()).path.strip("/").split("/")
            hub = segments[-2] if len(segments) > 1 and segments[-1] == "messages" else segments[-1]
        return f"{self.nh_connection().endpoint}{hub}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if _toml_path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=_toml_path))
        return tuple(sources)


_toml_path: Path | None = None
_rule_names: dict[int, str] = {}  # rule index -> name, for error messages

# Which names a user may have written for each field, for error messages.
_FIELD_NAMES: dict[str, str] = {
    "nh_connection_string": "RINGRELAY_NH_CONNECTION_STRING / ANHHubConnectionString / "
    "ANH_Hub_Connection_String",
    "nh_hub_name": "RINGRELAY_NH_HUB_NAME / ANHHubName / ANH_Hub_Name",
    "nh_hub_url": "RINGRELAY_NH_HUB_URL / ANHHubUrl / ANH_Hub_URL",
    "nh_api_version": "RINGRELAY_NH_API_VERSION / ANHHubApiVersion / ANH_Hub_Api_Version",
}


def _setting_name(loc: tuple[Any, ...]) -> str:
    if not loc:
        return "settings"
    if loc[0] == "rules" and len(loc) >= 2 and isinstance(loc[1], int):
        # rules[1] (name 'to-sales').conditions[0].values
        out = f"rules[{loc[1]}]"
        name = _rule_names.get(loc[1])
        if name:
            out += f" (name {name!r})"
        for part in loc[2:]:
            out += f"[{part}]" if isinstance(part, int) else f".{part}"
        return out
    if loc[0] in ("apns", "fcm", "routes"):
        # TOML tables: apns[0].key_file, routes.wns
        out = str(loc[0])
        for part in loc[1:]:
            out += f"[{part}]" if isinstance(part, int) else f".{part}"
        return out
    field = str(loc[0])
    for name, label in _FIELD_NAMES.items():
        if field == name or field in label.split(" / "):
            return label
    return f"RINGRELAY_{field.upper()}"


def _unknown_key(prefix: str, keys: Any, known: set[str]) -> str | None:
    """The first key of a TOML table that no setting reads, with the nearest known name."""
    for key in keys:
        if str(key).lower() not in known:
            near = difflib.get_close_matches(str(key).lower(), sorted(known), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            return f"{prefix}{key}: unknown key{hint}"
    return None


def _check_toml(path: Path) -> None:
    """Refuse a TOML file that does not parse, or that has a key no setting reads: pydantic
    would ignore a typo such as `ring_windw_seconds` and run on the default."""
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    known = set(Settings.model_fields)
    for field in Settings.model_fields.values():
        if isinstance(field.validation_alias, AliasChoices):
            known.update(str(a).lower() for a in field.validation_alias.choices)
    problem = _unknown_key("", doc, known)
    tables: list[tuple[str, type[BaseModel]]] = [("apns", ApnsApp), ("fcm", FcmApp)]
    for name, model in tables:
        apps = doc.get(name, [])
        for i, app in enumerate(apps if isinstance(apps, list) else []):
            if problem is None and isinstance(app, dict):
                problem = _unknown_key(f"{name}[{i}].", app, set(model.model_fields))
    routes = doc.get("routes", {})
    if problem is None and isinstance(routes, dict):
        problem = _unknown_key("routes.", routes, {p.value for p in Platform})
    if problem is not None:
        raise ConfigError(f"{path}: {problem}")


def _settings_error(exc: SettingsError) -> ConfigError:
    """pydantic-settings fails before validation on a JSON setting that does not parse."""
    found = re.search(r'field "(\w+)"', str(exc))
    if found is None:
        return ConfigError(f"invalid configuration: {exc}")
    name = f"RINGRELAY_{found.group(1).upper()}"
    cause = f": {exc.__cause__}" if exc.__cause__ is not None else ""
    return ConfigError(f"invalid configuration: {name}: not valid JSON{cause}")


def _read_rule_names(path: Path) -> dict[int, str]:
    import tomllib

    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return {}
    rules = doc.get("rules")
    if not isinstance(rules, list):
        return {}
    return {
        i: r["name"]
        for i, r in enumerate(rules)
        if isinstance(r, dict) and isinstance(r.get("name"), str)
    }


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Load settings; raise ConfigError naming the setting when one is malformed."""
    global _toml_path
    path = config_file or os.environ.get("RINGRELAY_CONFIG") or None
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"RINGRELAY_CONFIG / --config: no such file: {path}")
        _check_toml(path)
    _toml_path = path
    _rule_names.clear()
    if path is not None:
        _rule_names.update(_read_rule_names(path))
    env_rules = os.environ.get("RINGRELAY_RULES")
    if env_rules:
        import json

        try:
            parsed = json.loads(env_rules)
        except ValueError:
            parsed = None
        if isinstance(parsed, list):
            _rule_names.update(
                {
                    i: r["name"]
                    for i, r in enumerate(parsed)
                    if isinstance(r, dict) and isinstance(r.get("name"), str)
                }
            )
    for i, rule in enumerate(overrides.get("rules") or []):
        if isinstance(rule, dict) and isinstance(rule.get("name"), str):
            _rule_names[i] = rule["name"]
    try:
        return Settings(**overrides)
    except SettingsError as exc:
        raise _settings_error(exc) from None
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            msg = str(err["msg"]).removeprefix("Value error, ")
            if not err["loc"] and ":" in msg:
                lines.append(msg)
            else:
                lines.append(f"{_setting_name(tuple(err['loc']))}: {msg}")
        raise ConfigError("invalid configuration: " + "; ".join(lines)) from None
    finally:
        _toml_path = None
