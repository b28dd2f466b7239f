"""An independent decryptor of the Chat SDK's encrypted push, written from the SDK's code, not
from ringrelay's encryptor: Azure/azure-sdk-for-ios `sdk/communication/AzureCommunicationChat/
Source/PushNotification/PushNotificationKeyStorage.swift` (`decryptPayload`), `CryptoUtils.swift`
(`extract*`, `splitEncryptionKey`, `verifyEncryptedPayload`, `decryptPushNotificationPayload`)
and `PushNotificationPayload.swift` (`PushNotificationMessageReceivedPayload`). It is checked
against the SDK's own test vector (`CryptoUtilUnitTests`) in tests/test_chat_format.py."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

CIPHER_MODE_SIZE = 1
IV_SIZE = 16
HMAC_SIZE = 32

# PushNotificationMessageReceivedPayload: Decodable, every member a non-optional String.
MESSAGE_RECEIVED_KEYS = (
    "senderId",
    "recipientId",
    "transactionId",
    "groupId",
    "messageId",
    "messageType",
    "messageBody",
    "senderDisplayName",
    "clientMessageId",
    "originalArrivalTime",
    "priority",
    "version",
    "acsChatMessageMetadata",
)


class DecryptError(Exception):
    pass


def split_encryption_key(encryption_key_b64: str) -> tuple[bytes, bytes]:
    data = base64.b64decode(encryption_key_b64)
    # The loop in splitEncryptionKey: indices 0..31 -> aesArr, 32..63 -> authArr.
    return data[0:32], data[32:64]


def verify(cipher_mode_iv_ciphertext: bytes, auth_key: bytes, actual: bytes) -> bool:
    key = hashlib.sha256(auth_key).digest()
    calculated = hmac.new(key, cipher_mode_iv_ciphertext, hashlib.sha256).hexdigest()
    return calculated == actual.hex()


def aes_cbc_pkcs7_decrypt(ciphertext: bytes, iv: bytes, key: bytes) -> bytes:
    decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    # PKCS7 removed by hand (CommonCrypto does it inside CCCrypt).
    n = padded[-1]
    if not 1 <= n <= 16 or padded[-n:] != bytes([n]) * n:
        raise DecryptError("bad padding")
    return padded[:-n]


def decrypt_e(encrypted: str, encryption_keys_b64: list[str]) -> str:
    raw = base64.b64decode(encrypted)
    iv = raw[CIPHER_MODE_SIZE : CIPHER_MODE_SIZE + IV_SIZE]
    ciphertext = raw[CIPHER_MODE_SIZE + IV_SIZE : len(raw) - HMAC_SIZE]
    mac = raw[len(raw) - HMAC_SIZE :]
    signed = raw[: len(raw) - HMAC_SIZE]
    for key in encryption_keys_b64:
        aes_key, auth_key = split_encryption_key(key)
        if verify(signed, auth_key, mac):
            return aes_cbc_pkcs7_decrypt(ciphertext, iv, aes_key).decode("utf-8")
    raise DecryptError("Failed to decrypt the push notification.")


def decrypt_payload(notification: dict[str, Any], encryption_keys_b64: list[str]) -> dict[str, str]:
    """`decryptPayload(notification:)` for event 200: the APNs body (`aps` and `data`)."""
    data = notification.get("data")
    if not isinstance(data, dict):
        raise DecryptError("Push notification does not contain data payload")
    event_id = data.get("eventId")
    if not isinstance(event_id, int) or isinstance(event_id, bool):  # `as? Int`
        raise DecryptError("eventId missing or not an Int")
    if event_id != 200:  # PushNotificationChatEventType(forCode:) knows only 200
        raise DecryptError(f"unsupported eventId {event_id}")
    encrypted = data.get("e")
    if not isinstance(encrypted, str):
        raise DecryptError("e missing or not a String")
    doc = json.loads(decrypt_e(encrypted, encryption_keys_b64))
    for key in MESSAGE_RECEIVED_KEYS:
        if not isinstance(doc.get(key), str):
            raise DecryptError(f"{key}: missing or not a String")
    return doc
