"""Backend latency and throughput, in one run, printing a table.

    python benchmarks/backend.py [--iterations 2000]

Rows, for a real etcd 3.5.1 started on loopback:
- range (one key), txn-CAS (compare mod revision + put), lease refresh (keepalive), watch delivery (from the
  write's acknowledgement to the event reaching the watcher): coordkit's EtcdBackend against the floor, the same
  gateway requests sent with raw aiohttp and decoded with json.loads only. Both sides run interleaved in small
  rounds so machine noise hits them alike; the ratio column is EtcdBackend p50 / floor p50.
- the same rows for ``EtcdBackend(transport="grpc")`` against its floor: the same requests sent on one raw
  ``grpc.aio`` channel with coordkit's generated stubs (a LeaseKeepAlive stream and a Watch stream of its own),
  plus 1,000 concurrent ranges (throughput, ops/s).
- MemoryBackend operations per second on one core (sequential CAS txns, ranges).

Targets (issue 2): EtcdBackend within 1.5x of the floor on every row; MemoryBackend >= 50,000 txn/s.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time

import aiohttp
import anyio
import grpc
import grpc.aio
from _measure import interleaved, percentile
from google.protobuf.message import Message

from coordkit import Compare, EtcdBackend, MemoryBackend, Put, Range
from coordkit._backends.etcd._proto import rpc_pb2
from coordkit.testing import EtcdServer

Row = tuple[str, float, float, float, float]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Floor:
    """The same gateway requests, sent with raw aiohttp and decoded with json.loads alone."""

    def __init__(self, endpoint: str, http: aiohttp.ClientSession) -> None:
        self.endpoint = endpoint
        self.http = http

    async def post(self, path: str, body: dict[str, object]) -> dict[str, object]:
        async with self.http.post(self.endpoint + path, json=body) as response:
            result: dict[str, object] = json.loads(await response.read())
            return result


async def etcd_rows(iterations: int) -> list[Row]:
    rows = []
    with EtcdServer() as server:
        async with EtcdBackend(server.endpoint) as backend, aiohttp.ClientSession() as http:
            floor = Floor(server.endpoint, http)
            key = b"bench/key"
            first = await backend.txn([], [Put(key, b"value")])
            mod = {"coordkit": first.revision, "floor": first.revision}
            lease = await backend.grant(60)

            async def ck_range() -> None:
                await backend.range(Range(key))

            async def floor_range() -> None:
                await floor.post("/v3/kv/range", {"key": b64(key)})

            async def ck_cas() -> None:
                result = await backend.txn([Compare.mod(key, "==", mod["coordkit"])], [Put(key, b"value")])
                assert result.succeeded
                mod["coordkit"] = mod["floor"] = result.revision

            async def floor_cas() -> None:
                reply = await floor.post(
                    "/v3/kv/txn",
                    {
                        "compare": [
                            {"key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(mod["floor"])}
                        ],
                        "success": [{"request_put": {"key": b64(key), "value": b64(b"value")}}],
                    },
                )
                assert reply.get("succeeded")
                header = reply["header"]
                assert isinstance(header, dict)
                mod["coordkit"] = mod["floor"] = int(header["revision"])

            async def ck_refresh() -> None:
                await backend.refresh(lease.id)

            async def floor_refresh() -> None:
                await floor.post("/v3/lease/keepalive", {"ID": str(lease.id)})

            samples = await interleaved(
                {
                    "range coordkit": ck_range,
                    "range floor": floor_range,
                    "txn-CAS coordkit": ck_cas,
                    "txn-CAS floor": floor_cas,
                    "refresh coordkit": ck_refresh,
                    "refresh floor": floor_refresh,
                },
                iterations,
            )
            for op in ("range", "txn-CAS", "refresh"):
                ck, fl = samples[f"{op} coordkit"], samples[f"{op} floor"]
                rows.append((op, percentile(ck, 0.5), percentile(ck, 0.99), percentile(fl, 0.5), percentile(fl, 0.99)))
            watch = await watch_delivery(backend, http, server.endpoint, max(200, iterations // 4))
            for row, side in (("watch put->event", "sent"), ("watch ack->event", "acked")):
                ck, fl = watch[f"ck {side}"], watch[f"raw {side}"]
                rows.append((row, percentile(ck, 0.5), percentile(ck, 0.99), percentile(fl, 0.5), percentile(fl, 0.99)))
            await backend.revoke(lease.id)
    return rows


async def watch_delivery(
    backend: EtcdBackend, http: aiohttp.ClientSession, endpoint: str, count: int
) -> dict[str, list[float]]:
    """Watch latency, coordkit's watch vs a raw gateway stream, measured two ways.

    "put -> event": from sending a put to its event coming out of the watch (what a watcher waits for).
    "ack -> event": from the put's acknowledgement to the event; etcd usually sends the event first, so this is
    mostly the client's own reading and decoding cost. Each side watches its own prefix (neither stream
    carries the other's events); rounds alternate.
    """
    ck_prefix, raw_prefix = b"bench/ck/", b"bench/raw/"
    start = (await backend.range(Range(ck_prefix, prefix=True))).revision + 1
    samples: dict[str, list[float]] = {name: [] for name in ("ck sent", "ck acked", "raw sent", "raw acked")}
    raw_watch = {"key": b64(raw_prefix), "range_end": b64(b"bench/raw0"), "start_revision": str(start)}
    async with (
        backend.watch(ck_prefix, prefix=True, start_revision=start) as batches,
        http.post(
            endpoint + "/v3/watch",
            json={"create_request": raw_watch},
            timeout=aiohttp.ClientTimeout(total=None),
        ) as raw,
    ):
        created = json.loads(await raw.content.readline())
        assert created["result"].get("created")
        for i in range(count):
            sent = time.perf_counter()
            await backend.txn([], [Put(ck_prefix + str(i).encode(), b"x")])
            acked = time.perf_counter()
            await anext(batches)
            done = time.perf_counter()
            samples["ck sent"].append(done - sent)
            samples["ck acked"].append(done - acked)
            sent = time.perf_counter()
            await backend.txn([], [Put(raw_prefix + str(i).encode(), b"x")])
            acked = time.perf_counter()
            while not json.loads(await raw.content.readline())["result"].get("events"):
                pass
            done = time.perf_counter()
            samples["raw sent"].append(done - sent)
            samples["raw acked"].append(done - acked)
    return samples


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


async def grpc_rows(iterations: int) -> tuple[list[Row], tuple[float, float]]:
    """The gRPC transport against raw grpc.aio calls with the same stubs; and 1,000 concurrent ranges (ops/s)."""
    rows: list[Row] = []
    with EtcdServer() as server:
        target = server.endpoint.split("://", 1)[1]
        async with (
            EtcdBackend(server.endpoint, transport="grpc") as backend,
            grpc.aio.insecure_channel(target) as channel,
        ):
            range_call = channel.unary_unary(
                "/etcdserverpb.KV/Range",
                request_serializer=_serialize,
                response_deserializer=rpc_pb2.RangeResponse.FromString,
            )
            txn_call = channel.unary_unary(
                "/etcdserverpb.KV/Txn",
                request_serializer=_serialize,
                response_deserializer=rpc_pb2.TxnResponse.FromString,
            )
            keepalive = channel.stream_stream(
                "/etcdserverpb.Lease/LeaseKeepAlive",
                request_serializer=_serialize,
                response_deserializer=rpc_pb2.LeaseKeepAliveResponse.FromString,
            )()
            key = b"bench/key"
            first = await backend.txn([], [Put(key, b"value")])
            mod = {"rev": first.revision}
            lease = await backend.grant(60)

            async def ck_range() -> None:
                await backend.range(Range(key))

            async def floor_range() -> None:
                reply = await range_call(rpc_pb2.RangeRequest(key=key))
                [(kv.key, kv.value) for kv in reply.kvs]

            async def ck_cas() -> None:
                result = await backend.txn([Compare.mod(key, "==", mod["rev"])], [Put(key, b"value")])
                assert result.succeeded
                mod["rev"] = result.revision

            async def floor_cas() -> None:
                compare = rpc_pb2.Compare(
                    key=key, target=rpc_pb2.Compare.MOD, result=rpc_pb2.Compare.EQUAL, mod_revision=mod["rev"]
                )
                put = rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=b"value"))
                reply = await txn_call(rpc_pb2.TxnRequest(compare=[compare], success=[put]))
                assert reply.succeeded
                mod["rev"] = reply.header.revision

            async def ck_refresh() -> None:
                await backend.refresh(lease.id)

            async def floor_refresh() -> None:
                await keepalive.write(rpc_pb2.LeaseKeepAliveRequest(ID=lease.id))
                await keepalive.read()

            samples = await interleaved(
                {
                    "range coordkit": ck_range,
                    "range floor": floor_range,
                    "txn-CAS coordkit": ck_cas,
                    "txn-CAS floor": floor_cas,
                    "refresh coordkit": ck_refresh,
                    "refresh floor": floor_refresh,
                },
                iterations,
            )
            for op in ("range", "txn-CAS", "refresh"):
                ck, fl = samples[f"{op} coordkit"], samples[f"{op} floor"]
                rows.append((op, percentile(ck, 0.5), percentile(ck, 0.99), percentile(fl, 0.5), percentile(fl, 0.99)))
            watch = await grpc_watch_delivery(backend, channel, max(200, iterations // 4))
            for row, side in (("watch put->event", "sent"), ("watch ack->event", "acked")):
                ck, fl = watch[f"ck {side}"], watch[f"raw {side}"]
                rows.append((row, percentile(ck, 0.5), percentile(ck, 0.99), percentile(fl, 0.5), percentile(fl, 0.99)))
            keepalive.cancel()

            async def concurrent(call: object, count: int = 1000) -> float:
                started = time.perf_counter()
                async with anyio.create_task_group() as tg:
                    for _ in range(count):
                        tg.start_soon(call)  # type: ignore[arg-type]
                return count / (time.perf_counter() - started)

            throughput = [(await concurrent(ck_range), await concurrent(floor_range)) for _ in range(5)]
            await backend.revoke(lease.id)
    best = (max(ck for ck, _ in throughput), max(fl for _, fl in throughput))
    return rows, best


async def grpc_watch_delivery(backend: EtcdBackend, channel: grpc.aio.Channel, count: int) -> dict[str, list[float]]:
    """As `watch_delivery`, over gRPC: coordkit's watch vs a raw Watch stream of the same stubs."""
    ck_prefix, raw_prefix = b"bench/gck/", b"bench/graw/"
    start = (await backend.range(Range(ck_prefix, prefix=True))).revision + 1
    samples: dict[str, list[float]] = {name: [] for name in ("ck sent", "ck acked", "raw sent", "raw acked")}
    raw = channel.stream_stream(
        "/etcdserverpb.Watch/Watch",
        request_serializer=_serialize,
        response_deserializer=rpc_pb2.WatchResponse.FromString,
    )()
    create = rpc_pb2.WatchCreateRequest(key=raw_prefix, range_end=b"bench/graw0", start_revision=start)
    await raw.write(rpc_pb2.WatchRequest(create_request=create))
    created = await raw.read()
    assert isinstance(created, rpc_pb2.WatchResponse) and created.created
    async with backend.watch(ck_prefix, prefix=True, start_revision=start) as batches:
        for i in range(count):
            sent = time.perf_counter()
            await backend.txn([], [Put(ck_prefix + str(i).encode(), b"x")])
            acked = time.perf_counter()
            await anext(batches)
            done = time.perf_counter()
            samples["ck sent"].append(done - sent)
            samples["ck acked"].append(done - acked)
            sent = time.perf_counter()
            await backend.txn([], [Put(raw_prefix + str(i).encode(), b"x")])
            acked = time.perf_counter()
            while not getattr(await raw.read(), "events", None):
                pass
            done = time.perf_counter()
            samples["raw sent"].append(done - sent)
            samples["raw acked"].append(done - acked)
    raw.cancel()
    return samples


async def memory_rows(seconds: float = 2.0) -> list[tuple[str, float]]:
    backend = MemoryBackend()
    rows = []
    key = b"bench/key"
    mod = 0
    done = 0
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()
    while time.perf_counter() < deadline:
        for _ in range(1000):
            result = await backend.txn([Compare.mod(key, "==", mod)], [Put(key, b"value")])
            mod = result.revision
        done += 1000
    rows.append(("txn-CAS (sequential)", done / (time.perf_counter() - started)))
    done = 0
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()
    request = Range(key)
    while time.perf_counter() < deadline:
        for _ in range(1000):
            await backend.range(request)
        done += 1000
    rows.append(("range (sequential)", done / (time.perf_counter() - started)))
    return rows


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=2000, help="samples per etcd row and side")
    args = parser.parse_args()

    etcd = await etcd_rows(args.iterations)
    print(f"EtcdBackend vs raw gateway HTTP (the floor), {args.iterations} samples per side, times in ms")
    header = ("operation", "coordkit p50", "p99", "floor p50", "p99", "p50 ratio", "target")
    print(
        f"{header[0]:<16} {header[1]:>12} {header[2]:>8} {header[3]:>10} {header[4]:>8} {header[5]:>10} {header[6]:>7}"
    )
    for name, ck50, ck99, fl50, fl99 in etcd:
        ratio = ck50 / fl50
        verdict = "ok" if ratio <= 1.5 else "MISSED"
        print(
            f"{name:<16} {ck50 * 1e3:>12.3f} {ck99 * 1e3:>8.3f} {fl50 * 1e3:>10.3f} {fl99 * 1e3:>8.3f}"
            f" {ratio:>9.2f}x {verdict:>7}"
        )
    print()
    grpc_table, (ck_ops, floor_ops) = await grpc_rows(args.iterations)
    print(f"EtcdBackend(transport='grpc') vs raw grpc.aio (the floor), {args.iterations} samples per side, ms")
    print(
        f"{header[0]:<16} {header[1]:>12} {header[2]:>8} {header[3]:>10} {header[4]:>8} {header[5]:>10} {header[6]:>7}"
    )
    for name, ck50, ck99, fl50, fl99 in grpc_table:
        ratio = ck50 / fl50
        verdict = "ok" if ratio <= 1.15 else "MISSED"
        print(
            f"{name:<16} {ck50 * 1e3:>12.3f} {ck99 * 1e3:>8.3f} {fl50 * 1e3:>10.3f} {fl99 * 1e3:>8.3f}"
            f" {ratio:>9.2f}x {verdict:>7}"
        )
    verdict = "ok" if ck_ops >= 0.85 * floor_ops else "MISSED"
    print(f"1,000 concurrent ranges: coordkit {ck_ops:,.0f} ops/s, floor {floor_ops:,.0f} ops/s (best of 5) {verdict}")
    print()
    print("MemoryBackend on one core (asyncio)")
    for name, rate in await memory_rows():
        target = "" if not name.startswith("txn") else ("ok" if rate >= 50_000 else "MISSED (target 50,000)")
        print(f"{name:<22} {rate:>10,.0f} ops/s {target}")
    print(
        f"\nPython {sys.version.split()[0]}, aiohttp {aiohttp.__version__}, grpcio {grpc.__version__}, "
        f"{os.cpu_count()} cores"
    )


if __name__ == "__main__":
    anyio.run(main)
