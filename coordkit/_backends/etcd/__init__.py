"""The etcd v3 backend. Importing this package needs no extra: etcd3-py and aiohttp (the gateway transport,
``pip install 'coordkit[etcd]'``) or grpcio and protobuf (``transport="grpc"``, ``pip install 'coordkit[grpc]'``)
are imported when an `EtcdBackend` is built."""

from __future__ import annotations

from .backend import EtcdBackend as EtcdBackend

__all__ = ("EtcdBackend",)
