"""The Event Grid subscription that feeds ringrelay, as an ARM template and as the equivalent
`az eventgrid event-subscription create` command (`ringrelay eventgrid subscription`);
deploy/eventgrid-subscription.bicep declares the same resource for Bicep users.

Resource: `Microsoft.EventGrid/eventSubscriptions`, API version 2022-06-15, an extension resource
on the Communication Services resource (its system topic). Property names and types follow that
version's REST spec (Azure/azure-rest-api-specs specification/eventgrid/resource-manager/
Microsoft.EventGrid/stable/2022-06-15/EventGrid.json); the value ranges, which the spec does not
carry, follow learn.microsoft.com azure/event-grid/delivery-and-retry (attempts 1-30, TTL 1-1440
minutes, 1-5,000 events and 1-1,024 KB per batch) and event-filtering (25 advanced filters, 25
values each, 512 characters per string value).

The defaults are those recommended for IncomingCall (azure-docs concepts/call-automation/
incoming-call-notification.md): 2 delivery attempts and a 1-minute TTL, because a call that has
stopped ringing is not worth delivering; one event per batch (Event Grid's default, and what the
webhook answers fastest).

The webhook secret is never written out: the ARM template takes it as a `secureString` parameter
and the az command reads it from `$RINGRELAY_WEBHOOK_SECRET` when the shell runs it."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

API_VERSION = "2022-06-15"
INCOMING_CALL = "Microsoft.Communication.IncomingCall"
CALL_LIFECYCLE = (
    "Microsoft.Communication.CallStarted",
    "Microsoft.Communication.CallEnded",
    "Microsoft.Communication.CallParticipantAdded",
    "Microsoft.Communication.CallParticipantRemoved",
)
CHAT = (
    "Microsoft.Communication.ChatMessageReceived",
    "Microsoft.Communication.ChatMessageReceivedInThread",
    "Microsoft.Communication.ChatThreadCreatedWithUser",
    "Microsoft.Communication.ChatParticipantAddedToThreadWithUser",
)
# REST spec 2022-06-15, AdvancedFilter.operatorType.
OPERATORS = frozenset(
    {
        "NumberIn",
        "NumberNotIn",
        "NumberLessThan",
        "NumberGreaterThan",
        "NumberLessThanOrEquals",
        "NumberGreaterThanOrEquals",
        "BoolEquals",
        "StringIn",
        "StringNotIn",
        "StringBeginsWith",
        "StringEndsWith",
        "StringContains",
        "NumberInRange",
        "NumberNotInRange",
        "StringNotBeginsWith",
        "StringNotEndsWith",
        "StringNotContains",
        "IsNullOrUndefined",
        "IsNotNull",
    }
)
SINGLE_VALUE_OPERATORS = frozenset(
    {
        "NumberLessThan",
        "NumberGreaterThan",
        "NumberLessThanOrEquals",
        "NumberGreaterThanOrEquals",
        "BoolEquals",
    }
)
NO_VALUE_OPERATORS = frozenset({"IsNullOrUndefined", "IsNotNull"})
MAX_FILTERS = 25
MAX_VALUES = 25
MAX_STRING_VALUE = 512
NAME_RE = re.compile(r"^[A-Za-z0-9-]{3,64}$")  # REST spec: 3-64 characters, alphanumeric


class SubscriptionError(ValueError):
    """A subscription setting is out of range; the message names it."""


@dataclass
class SubscriptionSpec:
    endpoint: str  # the webhook URL without the secret, e.g. https://relay.example.com/api/events
    name: str = "ringrelay-incoming-call"
    event_types: list[str] = field(default_factory=lambda: [INCOMING_CALL])
    with_secret: bool = True  # append ?code=<RINGRELAY_WEBHOOK_SECRET>
    entra_tenant_id: str | None = None
    entra_audience: str | None = None  # application id or URI
    max_delivery_attempts: int = 2
    event_ttl_minutes: int = 1
    max_events_per_batch: int = 1
    preferred_batch_kb: int = 64
    advanced_filters: list[dict[str, Any]] = field(default_factory=list)
    dead_letter_storage_id: str | None = None  # a storage account's resource id
    dead_letter_container: str | None = None

    def check(self) -> None:
        problems = []
        parts = urlsplit(self.endpoint)
        if parts.scheme != "https" or not parts.hostname:
            problems.append("--endpoint: Event Grid delivers to https:// URLs only")
        if parts.query or parts.fragment:
            problems.append(
                "--endpoint: give the URL without a query; the secret is added as ?code="
            )
        if not NAME_RE.match(self.name):
            problems.append("--name: 3-64 characters of A-Z a-z 0-9 -")
        if not self.event_types:
            problems.append("event types: at least one")
        if not 1 <= self.max_delivery_attempts <= 30:
            problems.append("--max-delivery-attempts: 1-30")
        if not 1 <= self.event_ttl_minutes <= 1440:
            problems.append("--event-ttl: 1-1440 minutes")
        if not 1 <= self.max_events_per_batch <= 5000:
            problems.append("--max-events-per-batch: 1-5000")
        if not 1 <= self.preferred_batch_kb <= 1024:
            problems.append("--preferred-batch-size-in-kilobytes: 1-1024")
        if bool(self.entra_tenant_id) != bool(self.entra_audience):
            problems.append("--entra: needs both the tenant id and the audience")
        if bool(self.dead_letter_storage_id) != bool(self.dead_letter_container):
            problems.append("--dead-letter-storage and --dead-letter-container: give both")
        problems += check_advanced_filters(self.advanced_filters)
        if problems:
            raise SubscriptionError("; ".join(problems))


def check_advanced_filters(filters: list[dict[str, Any]]) -> list[str]:
    problems = []
    if len(filters) > MAX_FILTERS:
        problems.append(f"advanced filters: at most {MAX_FILTERS}")
    for i, f in enumerate(filters):
        where = f"advanced filter {i + 1}"
        op = f.get("operatorType") if isinstance(f, dict) else None
        if op not in OPERATORS:
            problems.append(f"{where}: operatorType must be one of {', '.join(sorted(OPERATORS))}")
            continue
        key = f.get("key")
        if not isinstance(key, str) or not key:
            problems.append(f"{where}: key missing")
        if op in NO_VALUE_OPERATORS:
            continue
        if op in SINGLE_VALUE_OPERATORS:
            if "value" not in f:
                problems.append(f"{where}: {op} takes one 'value'")
            continue
        values = f.get("values")
        if not isinstance(values, list) or not values:
            problems.append(f"{where}: {op} takes a non-empty 'values' list")
        elif len(values) > MAX_VALUES:
            problems.append(f"{where}: at most {MAX_VALUES} values")
        elif any(isinstance(v, str) and len(v) > MAX_STRING_VALUE for v in values):
            problems.append(f"{where}: string values of at most {MAX_STRING_VALUE} characters")
    return problems


def _destination_properties(spec: SubscriptionSpec, endpoint_expr: str) -> dict[str, Any]:
    props: dict[str, Any] = {
        "endpointUrl": endpoint_expr,
        "maxEventsPerBatch": spec.max_events_per_batch,
        "preferredBatchSizeInKilobytes": spec.preferred_batch_kb,
    }
    if spec.entra_tenant_id:
        props["azureActiveDirectoryTenantId"] = spec.entra_tenant_id
        props["azureActiveDirectoryApplicationIdOrUri"] = spec.entra_audience
    return props


def subscription_properties(spec: SubscriptionSpec, endpoint_expr: str) -> dict[str, Any]:
    """`properties` of the resource (REST spec EventSubscriptionProperties)."""
    props: dict[str, Any] = {
        "destination": {
            "endpointType": "WebHook",
            "properties": _destination_properties(spec, endpoint_expr),
        },
        "filter": {"includedEventTypes": list(spec.event_types)},
        "eventDeliverySchema": "EventGridSchema",
        "retryPolicy": {
            "maxDeliveryAttempts": spec.max_delivery_attempts,
            "eventTimeToLiveInMinutes": spec.event_ttl_minutes,
        },
    }
    if spec.advanced_filters:
        props["filter"]["advancedFilters"] = spec.advanced_filters
    if spec.dead_letter_storage_id:
        props["deadLetterDestination"] = {
            "endpointType": "StorageBlob",
            "properties": {
                "resourceId": spec.dead_letter_storage_id,
                "blobContainerName": spec.dead_letter_container,
            },
        }
    return props


def arm_template(spec: SubscriptionSpec) -> dict[str, Any]:
    """A deployment template (resource group scope) creating the subscription on an existing
    Communication Services resource of that group."""
    spec.check()
    parameters: dict[str, Any] = {
        "communicationServicesName": {
            "type": "string",
            "metadata": {"description": "The Communication Services resource whose events go out"},
        },
        "endpointUrl": {
            "type": "string",
            "defaultValue": spec.endpoint,
            "metadata": {"description": "ringrelay's webhook, without the secret"},
        },
    }
    endpoint = "[parameters('endpointUrl')]"
    if spec.with_secret:
        parameters["webhookSecret"] = {
            "type": "secureString",
            "metadata": {"description": "RINGRELAY_WEBHOOK_SECRET, sent as ?code="},
        }
        endpoint = (
            "[concat(parameters('endpointUrl'), '?code=', "
            "uriComponent(parameters('webhookSecret')))]"
        )
    return {
        "$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#",
        "contentVersion": "1.0.0.0",
        "parameters": parameters,
        "resources": [
            {
                "type": "Microsoft.EventGrid/eventSubscriptions",
                "apiVersion": API_VERSION,
                "name": spec.name,
                "scope": "[resourceId('Microsoft.Communication/communicationServices', "
                "parameters('communicationServicesName'))]",
                "properties": subscription_properties(spec, endpoint),
            }
        ],
    }


def spec_from_arm(template: dict[str, Any]) -> SubscriptionSpec:
    """The settings back from a template made by `arm_template` (the round trip is tested)."""
    (resource,) = template["resources"]
    props = resource["properties"]
    dest = props["destination"]["properties"]
    dead = props.get("deadLetterDestination", {}).get("properties", {})
    return SubscriptionSpec(
        endpoint=template["parameters"]["endpointUrl"]["defaultValue"],
        name=resource["name"],
        event_types=list(props["filter"]["includedEventTypes"]),
        with_secret="webhookSecret" in template["parameters"],
        entra_tenant_id=dest.get("azureActiveDirectoryTenantId"),
        entra_audience=dest.get("azureActiveDirectoryApplicationIdOrUri"),
        max_delivery_attempts=props["retryPolicy"]["maxDeliveryAttempts"],
        event_ttl_minutes=props["retryPolicy"]["eventTimeToLiveInMinutes"],
        max_events_per_batch=dest["maxEventsPerBatch"],
        preferred_batch_kb=dest["preferredBatchSizeInKilobytes"],
        advanced_filters=list(props["filter"].get("advancedFilters", [])),
        dead_letter_storage_id=dead.get("resourceId"),
        dead_letter_container=dead.get("blobContainerName"),
    )


def _filter_args(f: dict[str, Any]) -> list[str]:
    op = f["operatorType"]
    if op in NO_VALUE_OPERATORS:
        values: list[Any] = []
    elif op in SINGLE_VALUE_OPERATORS:
        values = [f["value"]]
    elif op in ("NumberInRange", "NumberNotInRange"):
        values = [f"{lo},{hi}" for lo, hi in f["values"]]
    else:
        values = list(f["values"])
    text = [str(v).lower() if isinstance(v, bool) else str(v) for v in values]
    return ["--advanced-filter", f["key"], op, *text]


def az_command(spec: SubscriptionSpec) -> str:
    """The `az eventgrid event-subscription create` command for the same subscription."""
    spec.check()
    endpoint = shlex.quote(spec.endpoint)
    if spec.with_secret:
        # Expanded by the shell that runs the command; never printed.
        endpoint = f'"{spec.endpoint}?code=${{RINGRELAY_WEBHOOK_SECRET:?set it first}}"'
    args: list[str] = [
        "--name",
        spec.name,
        "--source-resource-id",
        '"$ACS_RESOURCE_ID"',
        "--endpoint-type",
        "webhook",
        "--endpoint",
        endpoint,
        "--included-event-types",
        *spec.event_types,
        "--event-delivery-schema",
        "eventgridschema",
        "--max-delivery-attempts",
        str(spec.max_delivery_attempts),
        "--event-ttl",
        str(spec.event_ttl_minutes),
        "--max-events-per-batch",
        str(spec.max_events_per_batch),
        "--preferred-batch-size-in-kilobytes",
        str(spec.preferred_batch_kb),
    ]
    if spec.entra_tenant_id and spec.entra_audience:
        args += [
            "--azure-active-directory-tenant-id",
            spec.entra_tenant_id,
            "--azure-active-directory-application-id-or-uri",
            spec.entra_audience,
        ]
    if spec.dead_letter_storage_id:
        args += [
            "--deadletter-endpoint",
            f"{spec.dead_letter_storage_id}/blobServices/default/containers/"
            f"{spec.dead_letter_container}",
        ]
    for f in spec.advanced_filters:
        args += _filter_args(f)
    lines = ["az eventgrid event-subscription create"]
    i = 0
    while i < len(args):  # one option (and its values) per line
        j = i + 1
        while j < len(args) and not args[j].startswith("--"):
            j += 1
        quoted = [
            a if a.startswith(('"', "'")) or a == endpoint else shlex.quote(a) for a in args[i:j]
        ]
        lines.append("  " + " ".join(quoted))
        i = j
    return " \\\n".join(lines)
