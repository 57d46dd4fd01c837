"""The etcd v3 backend. Importing this package needs no etcd extra: etcd3-py and aiohttp are imported when an
`EtcdBackend` is built (``pip install 'coordkit[etcd]'``)."""

from __future__ import annotations

from .backend import EtcdBackend as EtcdBackend

__all__ = ("EtcdBackend",)
