"""API keys for trusted backends: `rr_<key id>_<secret>`, shown once, stored as SHA-256.

The secret is 32 random bytes, so a plain SHA-256 is enough to make a stolen database useless
(slow password hashes exist for low-entropy human passwords, which these are not).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from ringrelay.store import ApiKey

PREFIX = "rr_"
SCOPES = ("register", "read", "admin")


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_api_key(name: str, scopes: list[str]) -> tuple[str, ApiKey]:
    """The full key (to show once) and the record to store."""
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise ValueError(f"scopes must be some of {', '.join(SCOPES)}; got {scopes}")
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    record = ApiKey(key_id, name, _hash(secret), tuple(sorted(set(scopes))), time.time())
    return f"{PREFIX}{key_id}_{secret}", record


def split_key(presented: str) -> tuple[str, str] | None:
    if not presented.startswith(PREFIX):
        return None
    key_id, sep, secret = presented[len(PREFIX) :].partition("_")
    if not sep or not key_id or not secret:
        return None
    return key_id, secret


def secret_matches(record: ApiKey, secret: str) -> bool:
    return hmac.compare_digest(record.secret_hash, _hash(secret))
