"""ConfigView and publish on both backends: snapshot + changes, resume, resync, bad values, CAS, shared watch."""

from __future__ import annotations

import json
from contextlib import AsyncExitStack, aclosing
from functools import partial
from typing import Any

import anyio
import anyio.to_thread
import pytest

from coordkit import ConfigChange, ConfigView, Delete, EtcdBackend, Put, Range, publish, publish_many
from coordkit.testing import EtcdServer, Harness

pytestmark = pytest.mark.anyio


class Changes:
    """Collects a view's changes in a task; the test waits for them one by one."""

    def __init__(self, view: ConfigView[Any]) -> None:
        self.view = view
        self.seen: list[ConfigChange[Any]] = []
        self._taken = 0
        self._arrived = anyio.Event()
        self.ready = anyio.Event()

    async def run(self) -> None:
        async with aclosing(self.view.changes()) as changes:
            self.ready.set()
            async for change in changes:
                self.seen.append(change)
                self._arrived.set()
                self._arrived = anyio.Event()

    async def next(self) -> ConfigChange[Any]:
        with anyio.fail_after(15):
            while len(self.seen) <= self._taken:
                await self._arrived.wait()
        self._taken += 1
        return self.seen[self._taken - 1]


async def test_snapshot_then_changes(harness: Harness) -> None:
    prefix = harness.namespace.decode() + "app/"
    async with harness.client() as admin, harness.client() as service:
        await publish_many(admin, {prefix + "db/url": "postgres://a", prefix + "workers": 4}, expected=None)
        async with ConfigView(service, prefix) as view, anyio.create_task_group() as tg:
            assert dict(view.snapshot()) == {"db/url": "postgres://a", "workers": 4}
            assert view.get("workers") == 4 and view.get("missing") is None
            changes = Changes(view)
            tg.start_soon(changes.run)
            await changes.ready.wait()
            expected = view.key_revision("workers")
            revision = await publish(admin, prefix + "workers", 8, expected_revision=expected)
            assert revision is not None
            change = await changes.next()
            assert (change.key, change.value, change.previous, change.revision) == ("workers", 8, 4, revision)
            assert view.get("workers") == 8 and view.revision == revision
            await publish(admin, prefix + "db/url", None, expected_revision=None)  # None deletes
            change = await changes.next()
            assert change.deleted and change.previous == "postgres://a" and view.get("db/url") is None
            tg.cancel_scope.cancel()


async def test_wait_for(harness: Harness) -> None:
    prefix = harness.namespace.decode() + "wait/"
    async with harness.client() as admin, harness.client() as service:
        async with ConfigView(service, prefix) as view, anyio.create_task_group() as tg:

            async def later() -> None:
                await anyio.sleep(0.1)
                await publish(admin, prefix + "feature", True, expected_revision=0)

            tg.start_soon(later)
            with anyio.fail_after(15):
                state = await view.wait_for(lambda s: s.get("feature") is True)
            assert dict(state) == {"feature": True}


async def test_no_gap_no_duplicate_across_broken_streams(harness: Harness) -> None:
    prefix = harness.namespace.decode() + "seq/"
    async with harness.client() as admin, harness.client() as service:
        await publish(admin, prefix + "seq", 0, expected_revision=0)
        async with ConfigView(service, prefix) as view, anyio.create_task_group() as tg:
            changes = Changes(view)
            tg.start_soon(changes.run)
            await changes.ready.wait()
            for i in range(1, 31):
                await publish(admin, prefix + "seq", i, expected_revision=None)
                if i % 10 == 5:
                    with anyio.fail_after(15):
                        await view.wait_for(lambda s, i=i: s.get("seq") == i)  # type: ignore[misc]
                    harness.break_watches(service)
            for _ in range(30):
                await changes.next()
            assert [c.value for c in changes.seen] == list(range(1, 31))
            revisions = [c.revision for c in changes.seen]
            assert revisions == sorted(revisions) and len(set(revisions)) == 30
            tg.cancel_scope.cancel()


async def test_bad_value_keeps_previous_good_one(harness: Harness) -> None:
    prefix = harness.namespace.decode() + "bad/"
    async with harness.client() as admin, harness.client() as service:
        await publish(admin, prefix + "limit", 10, expected_revision=0)
        async with ConfigView(service, prefix) as view, anyio.create_task_group() as tg:
            changes = Changes(view)
            tg.start_soon(changes.run)
            await changes.ready.wait()
            await admin.txn([], [Put((prefix + "limit").encode(), b"{not json")])
            change = await changes.next()
            assert change.error is not None and change.value == 10 and view.get("limit") == 10
            assert "limit" in view.errors
            await publish(admin, prefix + "limit", 20, expected_revision=None)
            change = await changes.next()
            assert change.error is None and change.value == 20 and "limit" not in view.errors
            tg.cancel_scope.cancel()


async def test_keys_that_are_not_utf8_are_shown_faithfully(harness: Harness) -> None:
    """Keys written from outside with bytes that are not UTF-8: one entry each, never merged, never lost."""
    prefix = harness.namespace.decode() + "bytes/"
    raw = prefix.encode()
    a, b = raw + b"\xff", raw + b"\xfe"  # both used to show as "\ufffd" and collapsed into one entry
    async with harness.client() as outside, harness.client() as service:
        await outside.txn([], [Put(a, b"1"), Put(b, b"2"), Put(raw + b"caf\xc3\xa9", b"3")])
        async with ConfigView(service, prefix) as view, anyio.create_task_group() as tg:
            assert dict(view.snapshot()) == {"\udcff": 1, "\udcfe": 2, "café": 3}  # noqa: F601 (ruff misreads surrogates)
            changes = Changes(view)
            tg.start_soon(changes.run)
            await changes.ready.wait()
            revision = (await outside.txn([], [Delete(a)])).revision
            change = await changes.next()
            assert (change.key, change.deleted, change.revision) == ("\udcff", True, revision)
            assert dict(view.snapshot()) == {"\udcfe": 2, "café": 3}, "deleting one key leaves the other"
            # The key a view shows gives the stored bytes back: a publisher can compare-and-swap it.
            assert view.key_revision("\udcfe") > 0
            assert await publish(service, prefix + "\udcfe", 20, expected_revision=view.key_revision("\udcfe"))
            assert (await outside.range(Range(b))).kvs[0].value == b"20"
            change = await changes.next()
            assert (change.key, change.value, change.previous) == ("\udcfe", 20, 2)
            tg.cancel_scope.cancel()


async def test_compaction_resyncs_the_view(harness: Harness) -> None:
    prefix = harness.namespace.decode() + "compact/"
    async with harness.client() as admin, harness.client() as service:
        await publish_many(admin, {prefix + "a": 1, prefix + "b": 2}, expected=None)
        async with ConfigView(service, prefix) as view, anyio.create_task_group() as tg:
            changes = Changes(view)
            tg.start_soon(changes.run)
            await changes.ready.wait()
            harness.partition(service)  # the view's stream is down while history moves on and is compacted
            await publish(admin, prefix + "a", 10, expected_revision=None)
            await publish(admin, prefix + "b", None, expected_revision=None)
            revision = await publish(admin, prefix + "c", 3, expected_revision=None)
            assert revision is not None
            await harness.compact(revision)
            harness.heal(service)
            with anyio.fail_after(15):
                state = await view.wait_for(lambda s: s.get("c") == 3)
            assert dict(state) == {"a": 10, "c": 3}
            assert view.revision >= revision
            resynced = [await changes.next() for _ in range(3)]
            assert all(c.resync for c in resynced)
            assert {c.key for c in resynced} == {"a", "b", "c"}, "every difference reported, flagged as resync"
            tg.cancel_scope.cancel()


async def test_compare_and_swap_publishers(harness: Harness) -> None:
    prefix = harness.namespace.decode() + "cas/"
    async with harness.client() as admin:
        first = await publish(admin, prefix + "owner", "a", expected_revision=0)
        assert first is not None
        assert await publish(admin, prefix + "owner", "b", expected_revision=0) is None, "key exists"
        second = await publish(admin, prefix + "owner", "c", expected_revision=first)
        assert second is not None
        assert await publish(admin, prefix + "owner", "d", expected_revision=first) is None, "stale revision"
        both = await publish_many(
            admin, {prefix + "owner": "e", prefix + "other": "x"}, expected={prefix + "owner": second}
        )
        assert both is not None
        failed = await publish_many(
            admin, {prefix + "owner": "f", prefix + "third": "y"}, expected={prefix + "owner": second}
        )
        assert failed is None
        async with ConfigView(admin, prefix) as view:
            assert dict(view.snapshot()) == {"owner": "e", "other": "x"}, "all or nothing"


async def test_views_of_one_prefix_share_one_watch(harness: Harness) -> None:
    prefix = harness.namespace.decode() + "shared/"
    async with harness.client() as admin, harness.client() as service:
        await publish(admin, prefix + "v", 0, expected_revision=0)
        views = [ConfigView(service, prefix) for _ in range(20)]
        async with anyio.create_task_group() as tg:
            entered = anyio.Event()
            done = anyio.Event()

            async def hold(view: ConfigView[Any]) -> None:
                async with view:
                    if all(v.revision for v in views):
                        entered.set()
                    await done.wait()

            for view in views:
                tg.start_soon(hold, view)
            with anyio.fail_after(15):
                await entered.wait()
            assert all(view.statistics().followers == 20 for view in views)
            revision = await publish(admin, prefix + "v", 1, expected_revision=None)
            with anyio.fail_after(15):
                for view in views:
                    await view.wait_for(lambda s: s.get("v") == 1)
            assert all(view.revision >= (revision or 0) for view in views)
            assert views[0].statistics().watch_streams == 1, "one backend watch for all views"
            done.set()


class CountingCodec:
    """JSON that counts its decodes, and refuses the value "bad"."""

    def __init__(self) -> None:
        self.decodes = 0

    def encode(self, value: Any) -> bytes:
        return json.dumps(value).encode()

    def decode(self, data: bytes) -> Any:
        self.decodes += 1
        value = json.loads(data)
        if value == "bad":
            raise ValueError("bad value")
        return value


def caught_up(view: ConfigView[Any], revision: int, _: object) -> bool:
    """A wait_for predicate: the view shows ``revision`` or later (whatever its values)."""
    return view.revision >= revision


async def test_views_of_one_prefix_decode_each_value_once_per_codec(harness: Harness) -> None:
    """Ten views sharing a codec decode each stored value once between them, share the object, and share the
    error of a value that does not decode; a view with another codec decodes for itself."""
    prefix = harness.namespace.decode() + "decoded/"
    shared, other = CountingCodec(), CountingCodec()
    async with harness.client() as admin, harness.client() as service:
        await publish(admin, prefix + "v", {"n": 0}, expected_revision=0)
        async with AsyncExitStack() as stack:
            views = [await stack.enter_async_context(ConfigView(service, prefix, codec=shared)) for _ in range(10)]
            alone = await stack.enter_async_context(ConfigView(service, prefix, codec=other))
            assert shared.decodes == 1 and other.decodes == 1, "the state they started from was decoded once each"
            for n, value in enumerate([{"n": 1}, "bad", {"n": 2}], start=1):
                revision = await publish(admin, prefix + "v", value, expected_revision=None)
                with anyio.fail_after(15):
                    for view in [*views, alone]:  # wait_for looks again at every change the view takes in
                        await view.wait_for(partial(caught_up, view, revision or 0))
                assert (shared.decodes, other.decodes) == (n + 1, n + 1)
                if value == "bad":
                    errors = {id(view.errors["v"]) for view in views}
                    assert len(errors) == 1, "one decoding error, shared by the views of the codec"
                    assert views[0].get("v") == {"n": 1}, "the previous good value is kept"
            assert all(view.get("v") is views[0].get("v") for view in views), "one decoded object, shared"
            assert alone.get("v") == {"n": 2} and alone.get("v") is not views[0].get("v")


@pytest.mark.parametrize("kind", ["etcd"])
async def test_view_follows_across_an_etcd_restart(etcd_server: EtcdServer) -> None:
    """The real thing: the server restarts between changes; the view resumes with no lost or repeated change."""
    prefix = "restart/"
    async with EtcdBackend(etcd_server.endpoint) as admin, EtcdBackend(etcd_server.endpoint) as service:
        await publish(admin, prefix + "seq", 0, expected_revision=None)
        async with ConfigView(service, prefix) as view, anyio.create_task_group() as tg:
            changes = Changes(view)
            tg.start_soon(changes.run)
            await changes.ready.wait()
            for i in range(1, 4):
                await publish(admin, prefix + "seq", i, expected_revision=None)
            await anyio.to_thread.run_sync(etcd_server.stop)
            await anyio.to_thread.run_sync(etcd_server.start)
            for i in range(4, 7):  # the admin's first call after the restart reconnects by itself
                await publish(admin, prefix + "seq", i, expected_revision=None)
            got = [(await changes.next()).value for _ in range(6)]
            assert got == [1, 2, 3, 4, 5, 6]
            tg.cancel_scope.cancel()
