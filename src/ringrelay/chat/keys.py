"""Chat keys at rest: sealed with AES-256-GCM under `RINGRELAY_CHAT_KEY_ENCRYPTION_KEY`.

A registration's `chat_key` decrypts the user's messages, so a copy of the database alone must
not reveal it: the store keeps `v1.<base64(nonce ‖ ciphertext ‖ tag)>`, bound to its identity and
device (the associated data), so a sealed key moved onto another row does not open. The
encryption key lives in the settings (environment / secret store), never in the database.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PREFIX = "v1."
NONCE_SIZE = 12  # 96-bit nonces, random per seal (NIST SP 800-38D §8.2.2)


class ChatKeyVaultError(ValueError):
    pass


def parse_master_key(value: str) -> bytes:
    """The setting: standard base64 of 32 random bytes (`openssl rand -base64 32`)."""
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ChatKeyVaultError("not base64") from None
    if len(raw) != 32:
        raise ChatKeyVaultError(f"must decode to 32 bytes, got {len(raw)}")
    return raw


def _aad(identity: str, device_id: str) -> bytes:
    return f"ringrelay chat key\n{identity}\n{device_id}".encode()


class ChatKeyVault:
    def __init__(self, master_key: bytes) -> None:
        self._aead = AESGCM(master_key)
        # Opened keys by (sealed value, identity, device): every message would otherwise open
        # each device's key again. Bounded: cleared when it grows past the limit.
        self._opened: dict[tuple[str, str, str], bytes] = {}

    def seal(self, key: bytes, identity: str, device_id: str) -> str:
        nonce = os.urandom(NONCE_SIZE)
        sealed = self._aead.encrypt(nonce, key, _aad(identity, device_id))
        return PREFIX + base64.b64encode(nonce + sealed).decode("ascii")

    def open(self, sealed: str, identity: str, device_id: str) -> bytes:
        cached = self._opened.get((sealed, identity, device_id))
        if cached is not None:
            return cached
        if not sealed.startswith(PREFIX):
            raise ChatKeyVaultError("unknown sealed-key format")
        try:
            raw = base64.b64decode(sealed[len(PREFIX) :], validate=True)
            key = self._aead.decrypt(raw[:NONCE_SIZE], raw[NONCE_SIZE:], _aad(identity, device_id))
        except (binascii.Error, ValueError, InvalidTag):
            raise ChatKeyVaultError(
                "sealed chat key does not open (another RINGRELAY_CHAT_KEY_ENCRYPTION_KEY?)"
            ) from None
        if len(self._opened) >= 100_000:
            self._opened.clear()
        self._opened[(sealed, identity, device_id)] = key
        return key
