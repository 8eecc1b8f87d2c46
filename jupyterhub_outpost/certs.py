"""Certificates a hub sends with ``internal_ssl``: written for one start only.

Each start gets a private (0700) folder ``<base>/<hub>/<name>~<start_id>``
("~" is in neither a name nor a start id, so no two starts share one),
removed when the server stops. Nothing is written elsewhere: symlinks on
the way are not followed, and every file name is checked to stay in the
folder.
"""

import os

from .utils import open_private_dir, path_inside


def cert_segments(key):
    """The folder names of a server's certificates below the base folder"""
    hub, name, start_id = key
    return hub, f"{name}~{start_id}"


def cert_dir(base, key):
    """The certificate folder of server ``key`` (hub, name, start id)"""
    return os.path.join(base, *cert_segments(key))


def write_cert_files(base, key, certs, trust_bundles):
    """Write PEM texts to the folder of server ``key``; return (cert paths, bundle paths)"""
    segments = cert_segments(key)
    directory = os.path.join(os.path.realpath(base), *segments)
    fd = open_private_dir(os.path.realpath(base), segments)
    try:

        def write(filename, text):
            path = os.path.join(directory, filename)
            if os.path.dirname(path) != directory or not path_inside(directory, path):
                raise ValueError(f"Not a file name in the certificate folder: {filename!r}")
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
            file_fd = os.open(filename, flags, 0o600, dir_fd=fd)
            with os.fdopen(file_fd, "w") as f:
                f.write(text)
            return path

        paths = {key: write(f"{key}.pem", certs[key]) for key in ("keyfile", "certfile", "cafile") if certs.get(key)}
        bundles = {name: write(f"{name}.crt", text) for name, text in trust_bundles.items()}
    finally:
        os.close(fd)
    if "cafile" not in paths and "notebooks-ca" in bundles:
        paths["cafile"] = bundles["notebooks-ca"]
    return paths, bundles
