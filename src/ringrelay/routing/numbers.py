"""Number assignment: a PSTN number you own (E.164) -> the identity its calls are redirected to."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ringrelay.store import Store

# ITU-T E.164: a '+', a country code that does not start with 0, at most 15 digits in all.
E164_RE = re.compile(r"^\+[1-9][0-9]{6,14}$")
# Numbers assigned to numbers are followed this far when looking for a redirect loop.
MAX_NUMBER_CHAIN = 20


class NumberError(ValueError):
    """A number or target is malformed; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class NumberAssignment:
    e164: str  # +14255551212
    target: str  # raw id of the identity the number's calls go to
    label: str
    created_at: float
    updated_at: float


def check_e164(value: str) -> str:
    number = value.strip()
    if number.startswith("4:"):
        number = number[2:]
    if not E164_RE.match(number):
        raise NumberError("e164", "not an E.164 number: '+', country code, 7-15 digits in all")
    return number


def check_assignment_target(value: str, e164: str) -> str:
    from ringrelay.routing.rules import check_target

    try:
        raw = check_target(value)
    except ValueError as exc:
        raise NumberError("target", str(exc)) from None
    if raw == f"4:{e164}":
        raise NumberError("target", "a number cannot be assigned to itself (a redirect loop)")
    return raw


def phone_number_of(raw_id: str) -> str | None:
    """The E.164 number of a phone raw id (`4:+14255551212`), else None."""
    if raw_id.startswith("4:"):
        number = raw_id[2:]
        if not number.startswith("+"):
            number = "+" + number
        return number if E164_RE.match(number) else None
    return None


async def redirect_loop(store: Store, number: str, target: str) -> str | None:
    """The chain of assigned numbers that would bring `number`'s calls back to it, if assigning
    it to `target` closed one (numbers assigned to numbers, directly or through others): the
    correlationId guard might not see such a loop, as ACS may give each redirect a new one."""
    chain = [number]
    hop = phone_number_of(target)
    while hop is not None and len(chain) <= MAX_NUMBER_CHAIN:
        chain.append(hop)
        if hop == number:
            return " -> ".join(chain)
        assigned = await store.get_number(hop)
        hop = phone_number_of(assigned.target) if assigned is not None else None
    return None
