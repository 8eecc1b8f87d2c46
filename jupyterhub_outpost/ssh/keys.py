"""Host key and authorized keys of the SSH endpoint."""

import base64
import binascii
import os

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

# the public key types a hub may log in with (no ssh-rsa with SHA-1, no DSA)
KEY_TYPES = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "ssh-rsa",  # the key type; signatures must be rsa-sha2-256/512
)


def load_or_create_host_key(path):
    """The ed25519 host key in ``path``, generated (mode 0600) when missing.

    Returns ``(key, created)``. A key is never overwritten: hubs trust the
    first key they see, and a new one would break their connections.
    """
    if not os.path.exists(path):
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process made it first: use that one
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
            return paramiko.Ed25519Key(filename=path), True
    return paramiko.Ed25519Key(filename=path), False


def fingerprint(key):
    """The key's SHA256 fingerprint as ``ssh-keygen -l`` prints it"""
    return key.fingerprint


def parse_authorized_keys(text):
    """The key blobs in ``text`` (authorized_keys format).

    Blank lines and comments are skipped; options before the key type
    (``restrict,port-forwarding``) are ignored, as the endpoint allows
    forwarding to the hub's own servers and nothing else anyway. Returns
    ``(blobs, errors)``, errors naming the line numbers that hold no key.
    """
    blobs, errors = set(), []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        blob = _blob_of(line)
        if blob is None:
            errors.append(number)
        else:
            blobs.add(blob)
    return blobs, errors


def _blob_of(line):
    fields = line.split()
    for i, field in enumerate(fields[:-1]):
        if field in KEY_TYPES:
            try:
                blob = base64.b64decode(fields[i + 1], validate=True)
                blob_type = paramiko.Message(blob).get_text()
            except (binascii.Error, ValueError, UnicodeDecodeError):
                return None
            return blob if blob_type == field else None
    return None
