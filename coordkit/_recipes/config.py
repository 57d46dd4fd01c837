"""ConfigView: a live local copy of a key prefix; publish: compare-and-swap writes to it.

Guarantees: a view shows a state the store really had, at ``view.revision``, and never goes back to an older
one; it sees every change in order, with no gap or repeat across reconnects, and a full resync after
compaction (reported as such); a published value that does not decode is reported and the previous good value
kept, so a bad publish never crashes a consumer. Every key under the prefix is shown, whatever its bytes: a key
that is not UTF-8 appears under the text ``bytes.decode("utf-8", "surrogateescape")`` gives it (each byte that is
not UTF-8 becomes one lone surrogate, U+DC80 to U+DCFF, as ``os.fsdecode`` does), so distinct keys stay distinct and
``key.encode("utf-8", "surrogateescape")`` gives back the stored bytes. Publishing is a compare-and-swap on the key's
revision, so two publishers cannot silently overwrite each other. All the views of one prefix on one backend in a
process share one watch of the store.

A view that cannot follow the store any more fails loudly, never silently stale: transient failures (unavailable,
a malformed reply) are retried with backoff; a refusal (`AuthenticationError`: credentials or permission revoked)
cancels the body of ``async with ConfigView(...)``, which raises it.
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import Any, Generic, TypeVar, final, overload

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .. import _telemetry
from .._backends.protocol import Backend
from .._backends.types import Compare, Delete, EventType, KeyValue, Op, Put, WatchBatch
from .._codec import JSON, Codec
from .._errors import CoordkitError
from .._feed import Subscription, subscribe
from .._supervisor import keep_following, supervised
from .._watch import Snapshot

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ConfigChange(Generic[T]):
    """One change seen by a ConfigView.

    Attributes:
        key: the key, relative to the view's prefix.
        value: the value now (None when deleted; the previous good value when the new one did not decode).
        previous: the value before.
        revision: the store revision of the change.
        deleted: the key was deleted.
        error: why the published value could not be decoded (the view kept ``previous``), else None.
        resync: the change was found by a full resync after compaction, not observed as it happened.
    """

    key: str
    value: T | None
    previous: T | None
    revision: int
    deleted: bool = False
    error: Exception | None = None
    resync: bool = False


@dataclass(frozen=True, slots=True)
class ConfigStatistics:
    """State of a ConfigView.

    Attributes:
        revision: the store revision the view shows.
        keys: how many keys it holds.
        decode_errors: keys whose latest value could not be decoded.
        followers: views (in this process) sharing this view's backend watch, this one included.
        watch_streams: backend watches the shared feed has opened so far: one, plus one each time the follower
            reading for the others was cancelled mid-read (reconnects inside the watch do not count).
    """

    revision: int
    keys: int
    decode_errors: int
    followers: int
    watch_streams: int


@final
class ConfigView(Generic[T]):
    """A live, decoded copy of every key under ``prefix``.

    ``async with ConfigView(backend, "config/app/") as view:`` loads the current values, then follows every
    change from a task the view owns. ``view.get("db/url")`` reads a value (keys are relative to the prefix);
    ``view.snapshot()`` returns them all; ``view.revision`` is the store revision they reflect;
    ``view.changes()`` iterates changes as they arrive; ``await view.wait_for(predicate)`` waits for a state.

    Keys are the text after the prefix; a key that is not UTF-8 is shown with its undecodable bytes as lone
    surrogates (``surrogateescape``), so every stored key has exactly one entry.

    Args:
        backend: the store.
        prefix: the key prefix to follow (text; ``""`` follows every key).
        codec: decodes values (default JSON). A value that fails to decode keeps the previous good one and is
            listed in `errors`. Each stored value is decoded once for all the views of the prefix in this
            process that use the same codec object, and they share the decoded object: treat values as
            read-only (copy one before changing it).

    Raises:
        TypeError, ValueError: (at once) the prefix is not UTF-8 text.
        RuntimeError: (from ``async with``) the view was entered before; create another one.
        AuthenticationError: (from ``async with``, after cancelling its body; also from `changes` and `wait_for`)
            the store refused to let the view follow the prefix any more. Transient failures are retried.
    """

    @overload
    def __init__(self: ConfigView[Any], backend: Backend, prefix: str) -> None: ...

    @overload
    def __init__(self, backend: Backend, prefix: str, *, codec: Codec[T]) -> None: ...

    def __init__(self, backend: Backend, prefix: str, *, codec: Codec[Any] = JSON) -> None:
        self.backend = backend
        self.prefix = prefix
        self._prefix = _encode_key(prefix, "prefix", escaped=False)
        self._codec: Codec[T] = codec
        self._values: dict[str, T] = {}
        self._mod_revisions: dict[str, int] = {}
        self._errors: dict[str, Exception] = {}
        self._revision = 0
        self._subscription: Subscription | None = None
        self._changed = anyio.Event()
        self._listeners: set[MemoryObjectSendStream[ConfigChange[T]]] = set()
        self._stack: AsyncExitStack | None = None
        self._failure: CoordkitError | None = None
        self._frozen: Mapping[str, T] | None = None  # the snapshot of the current revision, once taken

    @property
    def revision(self) -> int:
        """The store revision the view shows."""
        return self._revision

    @property
    def errors(self) -> Mapping[str, Exception]:
        """Keys whose latest published value could not be decoded, with the error (their old value is kept)."""
        return MappingProxyType(self._errors)

    def statistics(self) -> ConfigStatistics:
        """The revision and size of the view, its decode errors, and what its shared watch costs."""
        feed = self._subscription.feed if self._subscription is not None else None
        return ConfigStatistics(
            self._revision,
            len(self._values),
            len(self._errors),
            feed.followers if feed is not None else 0,
            feed.streams_opened if feed is not None else 0,
        )

    def get(self, key: str, default: T | None = None) -> T | None:
        """The value of ``key`` (relative to the prefix), or ``default``."""
        return self._values.get(key, default)

    def key_revision(self, key: str) -> int:
        """The mod revision of ``key`` as the view shows it (0: absent): the ``expected_revision`` for `publish`."""
        return self._mod_revisions.get(key, 0)

    def snapshot(self) -> Mapping[str, T]:
        """Every value now, as an immutable mapping (one copy per revision, however many readers take it)."""
        if self._frozen is None:
            self._frozen = MappingProxyType(dict(self._values))
        return self._frozen

    async def wait_for(self, predicate: Callable[[Mapping[str, T]], bool]) -> Mapping[str, T]:
        """Wait until ``predicate(snapshot)`` holds; return that snapshot. Bound it with ``anyio.fail_after``.

        Raises:
            AuthenticationError: the view stopped following the store (see the class docstring).
        """
        while True:
            snapshot = self.snapshot()
            if predicate(snapshot):
                return snapshot
            if self._failure is not None:
                raise self._failure
            await self._changed.wait()

    def changes(self) -> AsyncGenerator[ConfigChange[T], None]:
        """Every change from this call on, in order. Stop early with ``contextlib.aclosing``."""
        send, receive = anyio.create_memory_object_stream[ConfigChange[T]](math.inf)
        self._listeners.add(send)  # registered now, not at the first iteration: nothing in between is missed
        return self._changes(send, receive)

    async def _changes(
        self, send: MemoryObjectSendStream[ConfigChange[T]], receive: MemoryObjectReceiveStream[ConfigChange[T]]
    ) -> AsyncGenerator[ConfigChange[T], None]:
        try:
            async with receive:
                async for change in receive:
                    yield change
        finally:
            self._listeners.discard(send)
            send.close()
        if self._failure is not None:  # the stream ended because the view stopped following: say why
            raise self._failure

    async def __aenter__(self) -> ConfigView[T]:
        if self._subscription is not None:
            raise RuntimeError(f"ConfigView {self.prefix!r} can be entered once; create another view")
        async with AsyncExitStack() as stack:
            self._subscription = subscription = await subscribe(self.backend, self._prefix, deliver=self._deliver)
            stack.push_async_callback(subscription.aclose)
            stack.callback(self._close_listeners)  # after the follower stopped: iterators end (or raise why)
            for kv in subscription.state.values():
                self._apply_put(kv, subscription.revision, resync=False, report=False)
            self._revision = subscription.revision
            supervisor = await stack.enter_async_context(supervised(f"ConfigView {self.prefix!r}"))
            supervisor.start_soon(self._follow_until_refused)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        assert self._stack is not None
        return await self._stack.__aexit__(exc_type, exc, tb)

    def _close_listeners(self) -> None:
        for listener in self._listeners:
            listener.close()
        self._changed.set()  # wait_for() wakes and raises the failure, if any

    async def _follow_until_refused(self) -> None:
        try:
            await keep_following(self._follow, span="coordkit.config.follow", backend=self.backend.name)
        except CoordkitError as exc:
            self._failure = exc
            raise

    async def _follow(self) -> None:
        # The views of a prefix take turns reading the shared watch; whichever reads hands each change to every
        # view's `_deliver`, in its own task: one task wakes per change, not one per view.
        assert self._subscription is not None
        await self._subscription.follow()

    def _deliver(self, item: Snapshot | WatchBatch) -> None:
        if isinstance(item, Snapshot):
            self._resync(item)
        else:
            for event in item.events:
                if event.type is EventType.PUT:
                    self._apply_put(event.kv, item.revision, resync=False, report=True)
                else:
                    self._apply_delete(self._relative(event.kv.key), item.revision, resync=False)
        self._revision = item.revision
        self._frozen = None
        self._changed.set()
        self._changed = anyio.Event()

    def _relative(self, key: bytes) -> str:
        # Faithful for any bytes (see the module docstring): distinct keys never collapse into one entry.
        return key[len(self._prefix) :].decode("utf-8", "surrogateescape")

    def _apply_put(self, kv: KeyValue, revision: int, *, resync: bool, report: bool) -> None:
        key = self._relative(kv.key)
        self._mod_revisions[key] = kv.mod_revision
        previous = self._values.get(key)
        assert self._subscription is not None
        value, exc = self._subscription.decoded(self._codec, kv)  # decoded once for every view of the prefix
        if exc is not None:  # a bad publish must not take the consumer down: keep the last good value
            self._errors[key] = exc
            _telemetry.config_decode_errors.add(1, {"coordkit.backend": self.backend.name})
            if report:
                self._emit(ConfigChange(key, previous, previous, revision, error=exc, resync=resync))
            return
        self._errors.pop(key, None)
        self._values[key] = value
        if report:
            self._emit(ConfigChange(key, value, previous, revision, resync=resync))

    def _apply_delete(self, key: str, revision: int, *, resync: bool) -> None:
        self._errors.pop(key, None)
        self._mod_revisions.pop(key, None)
        if key in self._values:
            previous = self._values.pop(key)
            self._emit(ConfigChange(key, None, previous, revision, deleted=True, resync=resync))

    def _resync(self, snapshot: Snapshot) -> None:
        fresh = {self._relative(kv.key): kv for kv in snapshot.kvs}
        for key in list(self._errors.keys() - fresh.keys()):  # undecodable, then deleted while we could not see
            self._errors.pop(key)
            self._mod_revisions.pop(key, None)
        for key in list(self._values.keys() - fresh.keys()):
            self._apply_delete(key, snapshot.revision, resync=True)
        for key, kv in fresh.items():
            if kv.mod_revision != self._mod_revisions.get(key):  # changed while we could not see it
                self._apply_put(kv, snapshot.revision, resync=True, report=True)

    def _emit(self, change: ConfigChange[T]) -> None:
        for listener in self._listeners:
            listener.send_nowait(change)


def _encode_key(key: str, what: str, *, escaped: bool = True) -> bytes:
    """A key's bytes. With ``escaped``, the text a view shows for a key that is not UTF-8 (with lone surrogates
    U+DC80..U+DCFF) gives back that key's bytes; other lone surrogates have no encoding and are refused."""
    if not isinstance(key, str):
        raise TypeError(f"a {what} is str, not {type(key).__name__}")
    try:
        return key.encode("utf-8", "surrogateescape" if escaped else "strict")
    except UnicodeEncodeError as exc:
        raise ValueError(f"a {what} must be valid UTF-8 text: {key!r}") from exc


async def publish(
    backend: Backend, key: str, value: Any, *, expected_revision: int | None, codec: Codec[Any] = JSON
) -> int | None:
    """Write ``value`` at ``key`` if the key is still as the caller last saw it (compare-and-swap).

    Args:
        expected_revision: the key's mod revision the caller based its change on (``view.key_revision(k)``;
            0 means "the key must not exist"); None writes unconditionally.
        codec: encodes the value (default JSON).

    Returns:
        The revision of the write, or None when the key had changed (someone else published first).

    Raises:
        TypeError, ValueError, RequestTooLargeError: as `publish_many`.
    """
    return await publish_many(
        backend, {key: value}, expected=None if expected_revision is None else {key: expected_revision}, codec=codec
    )


async def publish_many(
    backend: Backend,
    values: Mapping[str, Any],
    *,
    expected: Mapping[str, int] | None,
    codec: Codec[Any] = JSON,
) -> int | None:
    """Write several keys at once, atomically: all of them or none. A value of None deletes its key.

    Args:
        expected: key -> mod revision each key must still have (0: must not exist); keys not listed are not
            checked. None: no checks at all.

    Returns:
        The revision of the write, or None when a checked key had changed.

    Raises:
        TypeError, ValueError: (before anything is sent) a key that is not text or is empty, a revision that is not
            an int; whatever the codec raises for a value it cannot encode.
        RequestTooLargeError: the values exceed the server's request limit (etcd's default: 1.5 MiB in all).
        BackendError: more than 128 keys or checks at once (etcd's default ``--max-txn-ops``).
    """
    if not isinstance(values, Mapping) or not (expected is None or isinstance(expected, Mapping)):
        raise TypeError("values and expected are mappings of key -> value / revision")
    compares = [Compare.mod(_encode_key(key, "key"), "==", revision) for key, revision in (expected or {}).items()]
    ops: list[Op] = [
        Delete(_encode_key(key, "key")) if value is None else Put(_encode_key(key, "key"), codec.encode(value))
        for key, value in values.items()
    ]
    # Every listed key must still be as the caller saw it (compare-and-swap), so no concurrent publish is lost.
    result = await backend.txn(compares, ops)
    return result.revision if result.succeeded else None
