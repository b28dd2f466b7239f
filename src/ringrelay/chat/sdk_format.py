"""The push the ACS Chat SDK decrypts itself (`chat_format: "sdk"`).

Sources (Azure/azure-sdk-for-ios `sdk/communication/AzureCommunicationChat/Source/`):
- `PushNotification/PushNotificationKeyStorage.swift` `decryptPayload`: the APNs body's `data`
  holds `eventId` (an Int) and `e` (a base64 string); the SDK tries each stored 64-byte key,
  splits it, checks the HMAC and decrypts with the AES half.
- `CryptoUtils.swift`: the bytes of `e` are cipher mode (1) ‖ IV (16) ‖ ciphertext ‖ HMAC (32);
  `splitEncryptionKey` takes bytes 0-31 as the AES key and 32-63 as the auth key (the
  protocol's comment says the other way round; the code is what runs); `verifyEncryptedPayload`
  keys HMAC-SHA256 with SHA-256(auth key) over mode ‖ IV ‖ ciphertext; decryption is
  AES-256-CBC with PKCS7 padding (CommonCrypto `kCCOptionPKCS7Padding`).
- `PushNotificationPayload.swift` `PushNotificationMessageReceivedPayload`: the plaintext's
  keys, every value a string (`version` included).
- The cipher-mode byte 0x70: the SDK's own test vector starts with it (`CrytoUtilUnitTests`,
  "cBVK…") and its registrar request announces `"cryptoMethod": "0x70"`
  (../shared/fixtures/events/chatpush.registrar-request.ios-sdk-recording.json). Neither SDK
  checks the byte; it only enters the HMAC.
Android (Azure/azure-sdk-for-android `…/chat/implementation/notifications/NotificationUtils.java`)
uses the same layout (`CIPHER_MODE_SIZE = 1`, IV 16, HMAC 32, "AES/CBC/PKCS5Padding", HMAC keyed
with SHA-256 of the auth key) and knows event ids 200, 245-248, 257-261; iOS's
`PushNotificationChatEventType.swift` knows only 200.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from typing import Any

import orjson
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

EVENT_ID_MESSAGE_RECEIVED = 200
EVENT_ID_MESSAGE_EDITED = 247  # Android only
EVENT_ID_MESSAGE_DELETED = 248  # Android only

CIPHER_MODE = 0x70
IV_SIZE = 16
HMAC_SIZE = 32
KEY_SIZE = 64  # AES-256 key ‖ auth key, as the SDK generates it (SymmetricKey 512 bits)


class ChatKeyError(ValueError):
    """The app's chat key is not what the SDK generates."""


def decode_chat_key(value: str) -> bytes:
    """The registration's `chat_key`: standard base64 of the SDK's 64-byte key."""
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ChatKeyError("not base64") from None
    if len(raw) != KEY_SIZE:
        raise ChatKeyError(f"must decode to {KEY_SIZE} bytes (AES key ‖ auth key), got {len(raw)}")
    return raw


def split_key(key: bytes) -> tuple[bytes, bytes]:
    """(AES key, auth key): first half, second half (CryptoUtils.swift `splitEncryptionKey`)."""
    if len(key) != KEY_SIZE:
        raise ChatKeyError(f"chat key must be {KEY_SIZE} bytes")
    return key[:32], key[32:]


def encrypt(plaintext: bytes, key: bytes, iv: bytes | None = None) -> str:
    """The `e` value: base64(mode ‖ IV ‖ AES-256-CBC(PKCS7) ‖ HMAC-SHA256(SHA-256(auth), …))."""
    aes_key, auth_key = split_key(key)
    iv = os.urandom(IV_SIZE) if iv is None else iv
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(aes_key), modes.CBC(iv)).encryptor()
    body = bytes([CIPHER_MODE]) + iv + encryptor.update(padded) + encryptor.finalize()
    mac = hmac.new(hashlib.sha256(auth_key).digest(), body, hashlib.sha256).digest()
    return base64.b64encode(body + mac).decode("ascii")


def sdk_data(event_id: int, plaintext: dict[str, str], key: bytes) -> dict[str, Any]:
    """The push's `data` dictionary: `eventId` (a number on APNs, where the SDK casts it to Int)
    and the encrypted message."""
    return {"eventId": event_id, "e": encrypt(orjson.dumps(plaintext), key)}
