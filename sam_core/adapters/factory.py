"""Which :class:`~sam_core.adapters.store.AdapterStore` a deployment uses: :func:`open_store`, the one place.

An empty ``registry_url`` is the embedded default, the file-system store rooted at ``registry_dir``. An
``s3://bucket/prefix`` URL is the S3-compatible store; ``registry_dir`` is then its local download cache (it
must be writable) and ``endpoint_url`` selects a non-AWS server (MinIO, Ceph, moto). Any other URL is
InvalidInput on ``registry_url``.
"""

from __future__ import annotations

import os

from sam_core.adapters.store import AdapterStore, parse_s3_url


def open_store(registry_url: str, registry_dir: str | os.PathLike[str], *, endpoint_url: str = "") -> AdapterStore:
    """The adapter store a service reads from / publishes into (see the module docstring)."""
    if not registry_url:
        from sam_core.adapters.filesystem import FileSystemAdapterStore

        return FileSystemAdapterStore(registry_dir)
    parse_s3_url(registry_url)
    from sam_core.adapters.s3 import S3AdapterStore

    return S3AdapterStore(registry_url, cache_dir=registry_dir, endpoint_url=endpoint_url or None)
