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
- PostgresBackend against a real PostgreSQL on loopback (started by the benchmark): the same rows against the floor
  of the same SQL statements sent by hand with asyncpg on one connection; watch delivery (put sent -> event out);
  lease-expiry lateness (event time minus grant acknowledgement + TTL).

Targets (issue 2): EtcdBackend within 1.5x of the floor on every row; MemoryBackend >= 50,000 txn/s.
Targets (issue 16): PostgresBackend within 1.2x of its floor; watch p99 <= 10 ms; expiry lateness <= 0.5 s.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable, Mapping

import aiohttp
import anyio
import asyncpg
import grpc
import grpc.aio
from _measure import interleaved, percentile
from google.protobuf.message import Message

from coordkit import Compare, EtcdBackend, EventType, MemoryBackend, PostgresBackend, Put, Range
from coordkit._backends.etcd._proto import rpc_pb2
from coordkit.testing import EtcdServer, PostgresServer

Row = tuple[str, float, float, float, float]


Op = Callable[[], Awaitable[None]]


def _row(name: str, coordkit: list[float], floor: list[float]) -> Row:
    return (
        name,
        percentile(coordkit, 0.5),
        percentile(coordkit, 0.99),
        percentile(floor, 0.5),
        percentile(floor, 0.99),
    )


async def paired_rows(pairs: Mapping[str, tuple[Op, Op]], iterations: int) -> list[Row]:
    """Each (coordkit, floor) pair of calls, all interleaved in one measurement; a row per pair."""
    calls = {
        f"{name} {side}": call for name, pair in pairs.items() for side, call in zip(("ck", "floor"), pair, strict=True)
    }
    samples = await interleaved(calls, iterations)
    return [_row(name, samples[f"{name} ck"], samples[f"{name} floor"]) for name in pairs]


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
    rows: list[Row] = []
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

            pairs = {
                "range": (ck_range, floor_range),
                "txn-CAS": (ck_cas, floor_cas),
                "refresh": (ck_refresh, floor_refresh),
            }
            rows += await paired_rows(pairs, iterations)
            watch = await watch_delivery(backend, http, server.endpoint, max(200, iterations // 4))
            for row, side in (("watch put->event", "sent"), ("watch ack->event", "acked")):
                rows.append(_row(row, watch[f"ck {side}"], watch[f"raw {side}"]))
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

            pairs = {
                "range": (ck_range, floor_range),
                "txn-CAS": (ck_cas, floor_cas),
                "refresh": (ck_refresh, floor_refresh),
            }
            rows += await paired_rows(pairs, iterations)
            watch = await grpc_watch_delivery(backend, channel, max(200, iterations // 4))
            for row, side in (("watch put->event", "sent"), ("watch ack->event", "acked")):
                rows.append(_row(row, watch[f"ck {side}"], watch[f"raw {side}"]))
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
    rows: list[tuple[str, float]] = []
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


async def postgres_rows(iterations: int) -> tuple[list[tuple[str, float, float, float, float]], list[float]]:
    """PostgresBackend vs the same SQL sent by hand on one asyncpg connection (the floor); then expiry lateness."""
    rows: list[Row] = []
    with PostgresServer() as server:
        async with PostgresBackend(server.dsn) as backend:
            conn = await asyncpg.connect(server.dsn)
            key = b"bench/key"
            first = await backend.txn([], [Put(key, b"value")])
            mod = {"rev": first.revision}
            lease = await backend.grant(60)
            digest = hashlib.sha256(key).digest()
            columns = "key, value, create_revision, mod_revision, version, lease"

            async def ck_range() -> None:
                await backend.range(Range(key))

            async def floor_range() -> None:
                await conn.fetch(
                    f"WITH r AS MATERIALIZED (SELECT {columns} FROM coordkit.kv WHERE sha256(key) = $1 AND key = $2) "
                    "SELECT m.revision, (SELECT count(*) FROM r) AS total, f.* FROM coordkit.meta m "
                    "LEFT JOIN LATERAL (SELECT * FROM r ORDER BY key) f ON true ORDER BY f.key",
                    digest,
                    key,
                )

            async def ck_cas() -> None:
                result = await backend.txn([Compare.mod(key, "==", mod["rev"])], [Put(key, b"value")])
                assert result.succeeded
                mod["rev"] = result.revision

            async def floor_cas() -> None:
                async with conn.transaction():
                    rev = await conn.fetchval("SELECT revision FROM coordkit.meta WHERE id = 1 FOR UPDATE")
                    row = await conn.fetchrow(
                        f"SELECT {columns} FROM coordkit.kv WHERE sha256(key) = ANY($1::bytea[]) "
                        "AND key = ANY($2::bytea[])",
                        [digest],
                        [key],
                    )
                    assert row is not None and row["mod_revision"] == mod["rev"]
                    new = await conn.fetchrow(
                        f"INSERT INTO coordkit.kv AS k ({columns}) VALUES ($1, $2, $3, $3, 1, 0) "
                        "ON CONFLICT ((sha256(key))) DO UPDATE SET value = EXCLUDED.value, "
                        "mod_revision = EXCLUDED.mod_revision, version = k.version + 1, lease = EXCLUDED.lease "
                        "RETURNING create_revision, version",
                        key,
                        b"value",
                        rev + 1,
                    )
                    assert new is not None
                    await conn.execute(
                        "WITH logged AS (INSERT INTO coordkit.log "
                        "(revision, seq, type, key, value, create_revision, version, lease) "
                        "SELECT $1, u.ord - 1, u.type, u.key, u.value, u.create_revision, u.version, u.lease FROM "
                        "unnest($3::smallint[], $4::bytea[], $5::bytea[], $6::bigint[], $7::bigint[], $8::bigint[]) "
                        "WITH ORDINALITY AS u(type, key, value, create_revision, version, lease, ord)) "
                        "UPDATE coordkit.meta SET revision = $1 WHERE id = 1 RETURNING pg_notify($2, $1::text)",
                        rev + 1,
                        "coordkit_coordkit",
                        [0],
                        [key],
                        [b"value"],
                        [new["create_revision"]],
                        [new["version"]],
                        [0],
                    )
                mod["rev"] = rev + 1

            async def ck_refresh() -> None:
                await backend.refresh(lease.id)

            async def floor_refresh() -> None:
                await conn.fetchval(
                    "UPDATE coordkit.lease SET expires_at = now() + make_interval(secs => ttl) "
                    "WHERE id = $1 AND expires_at > now() RETURNING ttl",
                    lease.id,
                )

            pairs = {
                "range": (ck_range, floor_range),
                "txn-CAS": (ck_cas, floor_cas),
                "refresh": (ck_refresh, floor_refresh),
            }
            rows += await paired_rows(pairs, iterations)
            await conn.close()
            watch = await put_to_event(backend, max(200, iterations // 4))
            rows.append(("watch put->event", percentile(watch, 0.5), percentile(watch, 0.99), math.nan, math.nan))
            lateness = await expiry_lateness(backend, 20)
    return rows, lateness


async def put_to_event(backend: PostgresBackend, count: int) -> list[float]:
    prefix = b"bench/watch/"
    start = (await backend.range(Range(prefix, prefix=True))).revision + 1
    samples = []
    async with backend.watch(prefix, prefix=True, start_revision=start) as batches:
        for i in range(count):
            sent = time.perf_counter()
            await backend.txn([], [Put(prefix + str(i).encode(), b"x")])
            await anext(batches)
            samples.append(time.perf_counter() - sent)
    return samples


async def expiry_lateness(backend: PostgresBackend, count: int) -> list[float]:
    """``count`` leases of 2 s, each with a key, granted 50 ms apart: event time minus (grant ack + TTL)."""
    prefix = b"bench/expiry/"
    start = (await backend.range(Range(prefix, prefix=True))).revision + 1
    due: dict[bytes, float] = {}
    lateness: list[float] = []
    async with backend.watch(prefix, prefix=True, start_revision=start) as batches:
        for i in range(count):
            lease = await backend.grant(2)
            acked = time.perf_counter()
            key = prefix + str(i).encode()
            await backend.txn([], [Put(key, b"", lease.id)])
            due[key] = acked + lease.ttl
            await anyio.sleep(0.05)
        while len(lateness) < count:
            batch = await anext(batches)
            for event in batch.events:
                if event.type is EventType.DELETE:
                    lateness.append(time.perf_counter() - due[event.kv.key])
    return lateness


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
    print()
    pg, lateness = await postgres_rows(args.iterations)
    print(f"PostgresBackend vs the same SQL by hand with asyncpg (the floor), {args.iterations} samples, times in ms")
    print(
        f"{header[0]:<16} {header[1]:>12} {header[2]:>8} {header[3]:>10} {header[4]:>8} {header[5]:>10} {header[6]:>7}"
    )
    for name, ck50, ck99, fl50, fl99 in pg:
        if math.isnan(fl50):
            verdict = "ok" if ck99 <= 0.010 else "MISSED"
            print(f"{name:<16} {ck50 * 1e3:>12.3f} {ck99 * 1e3:>8.3f} {'':>10} {'':>8} {'':>10} {verdict:>7}")
            continue
        ratio = ck50 / fl50
        verdict = "ok" if ratio <= 1.2 else "MISSED"
        print(
            f"{name:<16} {ck50 * 1e3:>12.3f} {ck99 * 1e3:>8.3f} {fl50 * 1e3:>10.3f} {fl99 * 1e3:>8.3f}"
            f" {ratio:>9.2f}x {verdict:>7}"
        )
    late50, late_max = percentile(lateness, 0.5), max(lateness)
    verdict = "ok" if late_max <= 0.5 else "MISSED"
    print(
        f"lease expiry lateness ({len(lateness)} leases of 2 s): "
        f"p50 {late50 * 1e3:.1f} ms, max {late_max * 1e3:.1f} ms {verdict}"
    )
    print(
        f"\nPython {sys.version.split()[0]}, aiohttp {aiohttp.__version__}, asyncpg {asyncpg.__version__}, "
        f"grpcio {grpc.__version__}, "
        f"{os.cpu_count()} cores"
    )


if __name__ == "__main__":
    anyio.run(main)
