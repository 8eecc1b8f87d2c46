"""Encryption of secrets at rest.

Spawner state and the stored part of each start request (the hub's
environment holds the server's API token) are encrypted with Fernet.
Several keys may be configured: the first encrypts, all decrypt, which
allows rotating keys without losing records.
"""

import base64
import binascii
import os

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

KEY_ENV = "OUTPOST_CRYPT_KEY"


class EncryptionError(Exception):
    """A record could not be encrypted or decrypted with the configured keys"""


def parse_keys(text):
    """Split a key list as given in the environment (``;`` or ``,`` separated)"""
    return [k.strip() for k in text.replace(",", ";").split(";") if k.strip()]


def normalize_key(key):
    """Accept a Fernet key (url-safe base64 of 32 bytes) or 64 hex digits.

    Returns the Fernet key as bytes; raises ValueError for anything else.
    """
    if isinstance(key, str):
        key = key.strip().encode("ascii", "replace")
    if len(key) == 64:
        try:
            return base64.urlsafe_b64encode(binascii.unhexlify(key))
        except binascii.Error:
            pass
    try:
        if len(base64.urlsafe_b64decode(key)) == 32:
            return key
    except (binascii.Error, ValueError):
        pass
    raise ValueError(
        "Encryption keys must be Fernet keys (32 url-safe base64-encoded bytes) "
        "or 64 hexadecimal digits"
    )


def load_or_create_key_file(path):
    """Read the generated key at ``path``, creating it (mode 0600) if absent.

    Returns ``(key, created)``.
    """
    try:
        with open(path, "rb") as f:
            return f.read().strip(), False
    except FileNotFoundError:
        pass
    key = Fernet.generate_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key + b"\n")
    return key, True


class CryptKeeper:
    """Encrypt and decrypt bytes with a list of keys (first one encrypts).

    Methods are synchronous: callers run them off the event loop (the
    database worker threads do, see :mod:`jupyterhub_outpost.orm`).
    """

    def __init__(self, keys):
        if not keys:
            raise EncryptionError("No encryption key configured")
        self.fernet = MultiFernet([Fernet(normalize_key(k)) for k in keys])
        self._first_key = normalize_key(keys[0])

    def encrypt(self, data: bytes) -> bytes:
        return self.fernet.encrypt(data)

    def derived_secret(self, purpose: str) -> bytes:
        """A secret for ``purpose`` (signing cookies, ...), the same in every
        process with the same encrypting key"""
        import hashlib
        import hmac

        return hmac.new(self._first_key, b"jupyterhub-outpost " + purpose.encode(), hashlib.sha256).digest()

    def decrypt(self, data: bytes) -> bytes:
        try:
            return self.fernet.decrypt(data)
        except InvalidToken:
            raise EncryptionError(
                "A stored record cannot be decrypted with the configured keys"
            ) from None
