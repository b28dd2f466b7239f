"""Short, stable fingerprints for secrets that must never be logged or listed in full."""

from __future__ import annotations

import hashlib


def fingerprint(secret: str) -> str:
    """`sha256:1a2b3c4d (64 chars)`: enough to tell two values apart, useless to an attacker."""
    digest = hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"sha256:{digest} ({len(secret)} chars)"
