"""Group: TTL-heartbeat membership. A member is a key bound to its session's lease.

Guarantees: a member's key lives exactly as long as its session's lease; a member that leaves (exits its
``async with``) disappears at once, one that crashes disappears when its lease expires (within the TTL);
``members()`` is a consistent snapshot at one revision; ``watch()`` reports every membership change in the
store's order, with no gap or repeat across reconnects, and a full view after compaction. A member id is
unique in a group: a second join with the same id is refused, not duplicated.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import final

import anyio

from .._backends.types import Compare, Delete, EventType, KeyValue, Put, Range, RangeResult
from .._errors import CoordkitError, NotOwnerError, OwnershipLostError
from .._keys import name_prefix
from .._retry import retry_call
from .._session import Session, require_session, retry_while_valid
from .._watch import Snapshot, Watch


class MembershipLostError(OwnershipLostError):
    """The session under a membership was lost: the member's block was cancelled; it left the group."""


class MemberExistsError(CoordkitError):
    """A member with this id is already in the group (another process, or another join of this session)."""


@dataclass(frozen=True, slots=True)
class GroupView:
    """The members of a group at one revision, and what changed since the previous view.

    Attributes:
        members: member id -> metadata.
        revision: the store revision this view reflects.
        joined: ids that appeared since the previous view (all of them in the first view).
        left: ids that disappeared since the previous view.
        updated: ids whose metadata changed since the previous view (a rewrite with the same bytes is not a
            change).
        resync: True for a full view taken after compaction (changes in between were not observed one by one).
    """

    members: Mapping[str, bytes]
    revision: int
    joined: frozenset[str] = field(default_factory=frozenset)
    left: frozenset[str] = field(default_factory=frozenset)
    updated: frozenset[str] = field(default_factory=frozenset)
    resync: bool = False


@final
class Membership:
    """Being a member, inside ``async with group.join(member_id) as member``.

    Attributes:
        member_id: this member's id.
        key: its key in the store.
        revision: the key's create revision.
    """

    def __init__(self, group: Group, member_id: str, metadata: bytes) -> None:
        self._group = group
        self.member_id = member_id
        self.key = group._prefix + member_id.encode()
        self.revision = 0
        self._metadata = metadata
        self._stack: AsyncExitStack | None = None  # the guarded block, while a member

    @property
    def metadata(self) -> bytes:
        """The metadata last published for this member."""
        return self._metadata

    async def update(self, metadata: bytes) -> None:
        """Publish new metadata (load, address, ...) without leaving and rejoining.

        Raises:
            NotOwnerError: the membership is over (left, or the lease is gone).
        """
        if not isinstance(metadata, bytes):
            raise TypeError(f"metadata is bytes, not {type(metadata).__name__}")
        if not self.revision:
            raise NotOwnerError(f"member {self.member_id!r} has not joined group {self._group.name!r}")
        session = self._group.session
        # Only while our key is the one we created: a member that rejoined with this id since (after our lease
        # ended) must not have its metadata overwritten, nor our key be created again after it left.
        result = await session.backend.txn(
            [Compare.create(self.key, "==", self.revision)], [Put(self.key, metadata, session.lease_id)]
        )
        if not result.succeeded:
            raise NotOwnerError(f"member {self.member_id!r} is no longer in group {self._group.name!r}")
        self._metadata = metadata

    async def __aenter__(self) -> Membership:
        session = self._group.session
        async with AsyncExitStack() as stack:
            # Entering the guarded block first refuses a session that is not open, before anything is written.
            await stack.enter_async_context(
                session.guarded(MembershipLostError, what=f"member {self.member_id!r} of group {self._group.name!r}")
            )
            await self._join()
            self._stack = stack.pop_all()
        return self

    async def _join(self) -> None:
        session = self._group.session
        mine = session._in_use.members
        if self.key in mine:
            raise MemberExistsError(f"this session already joined group {self._group.name!r} as {self.member_id!r}")
        # Create our key unless it exists. If it does with our lease, an earlier attempt of this join got through.
        try:
            result = await retry_call(
                lambda: session.backend.txn(
                    [Compare.create(self.key, "==", 0)],
                    [Put(self.key, self._metadata, session.lease_id)],
                    [Range(self.key)],
                )
            )
        except BaseException:
            # Cancelled (or failed) with the write in flight: it may have been applied, unanswered. A member that
            # never joined must not stay listed for as long as our session lives: drop the key if it is ours.
            with anyio.CancelScope(shield=True):
                await retry_while_valid(
                    session,
                    lambda: session.backend.txn([Compare.lease(self.key, "==", session.lease_id)], [Delete(self.key)]),
                )
            raise
        if result.succeeded:
            self.revision = result.revision
        else:
            existing = result.responses[0]
            assert isinstance(existing, RangeResult)
            if not existing.kvs or existing.kvs[0].lease != session.lease_id:
                raise MemberExistsError(f"group {self._group.name!r} already has a member {self.member_id!r}")
            self.revision = existing.kvs[0].create_revision
        mine.add(self.key)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        stack, self._stack = self._stack, None
        assert stack is not None
        try:
            return await stack.__aexit__(exc_type, exc, tb)
        finally:
            await self._leave()

    async def _leave(self) -> None:
        session = self._group.session
        session._in_use.members.discard(self.key)
        # Leave at once, even when cancelled; once the session is lost, its lease ends and takes the key anyway.
        # Only our key (created at our revision): a member that joined with this id since stays.
        with anyio.CancelScope(shield=True):
            await retry_while_valid(
                session,
                lambda: session.backend.txn([Compare.create(self.key, "==", self.revision)], [Delete(self.key)]),
            )


@final
class Group:
    """A membership group named ``name``: members heartbeat through their session's lease.

    ``async with group.join("worker-7", metadata=b"10.0.0.7:8080") as member:`` is a member for as long as the
    block lasts (and the session is valid: if it is lost, the block is cancelled and raises
    ``MembershipLostError``). ``await group.members()`` lists the members; ``group.watch()`` follows joins,
    leaves and metadata updates.

    Args:
        session: the session whose lease member keys are bound to (for `join`; observing needs no lease).
        name: the group's name; member keys are ``<name>/<member id>``. Keys under ``<name>/`` that no member
            can have (those of a nested group ``<name>/sub``, keys that are not UTF-8) are not members.
    """

    def __init__(self, session: Session, name: str) -> None:
        self.session = require_session(session)
        self.name = name
        self._prefix = name_prefix(name)

    def join(self, member_id: str, *, metadata: bytes = b"") -> Membership:
        """Join as ``member_id`` (``async with`` it); see the class docstring.

        Raises:
            ValueError: the id is empty, contains "/" or is not valid UTF-8.
            MemberExistsError: (from ``async with``) the id is taken.
        """
        if not isinstance(member_id, str):
            raise TypeError(f"member ids are str, not {type(member_id).__name__}")
        if not member_id or "/" in member_id:
            raise ValueError(f"a member id must be non-empty and contain no '/': {member_id!r}")
        name_prefix(member_id)  # the same text rules as names
        if not isinstance(metadata, bytes):
            raise TypeError(f"metadata is bytes, not {type(metadata).__name__}")
        return Membership(self, member_id, metadata)

    async def members(self) -> GroupView:
        """The members now, as one consistent view."""
        result = await self.session.backend.range(Range(self._prefix, prefix=True))
        members = self._members(result.kvs)
        return GroupView(MappingProxyType(members), result.revision, joined=frozenset(members))

    def watch(self) -> AsyncGenerator[GroupView, None]:
        """The member set after every change, starting with the current one.

        Each view says who joined, left or updated since the one before. Reconnects resume without a gap or a
        repeat; after a compaction a full view with ``resync=True`` is reported. Stop early with
        ``contextlib.aclosing``.
        """
        return self._views()

    def _member_id(self, key: bytes) -> str | None:
        """The member id of a key under the prefix, or None for a key that is no member's.

        Names nest: the keys of a group ``<name>/sub`` are under this prefix too. Keys that are not a possible
        member key (with a "/" after the prefix, or not UTF-8: written by something else) are left out.
        """
        rest = key[len(self._prefix) :]
        if not rest or b"/" in rest:
            return None
        try:
            return rest.decode()
        except UnicodeDecodeError:
            return None

    def _members(self, kvs: Iterable[KeyValue]) -> dict[str, bytes]:
        return {member_id: kv.value for kv in kvs if (member_id := self._member_id(kv.key)) is not None}

    async def _views(self) -> AsyncGenerator[GroupView, None]:
        members: dict[str, bytes] = {}
        async with Watch(self.session.backend, self._prefix, prefix=True) as watch:
            async for item in watch:
                if isinstance(item, Snapshot):
                    fresh = self._members(item.kvs)
                    joined = frozenset(fresh.keys() - members.keys())
                    left = frozenset(members.keys() - fresh.keys())
                    updated = frozenset(k for k in fresh.keys() & members.keys() if fresh[k] != members[k])
                    members = fresh
                    yield GroupView(MappingProxyType(dict(members)), item.revision, joined, left, updated, item.resync)
                    continue
                joined_ids, left_ids, updated_ids = set(), set(), set()
                ours = False
                for event in item.events:
                    member_id = self._member_id(event.kv.key)
                    if member_id is None:
                        continue
                    ours = True
                    if event.type is EventType.PUT:
                        if member_id not in members:
                            joined_ids.add(member_id)
                        elif members[member_id] != event.kv.value:
                            updated_ids.add(member_id)
                        members[member_id] = event.kv.value
                    elif members.pop(member_id, None) is not None:
                        left_ids.add(member_id)
                if not ours:
                    continue  # only keys of a nested group (or foreign ones) changed
                yield GroupView(
                    MappingProxyType(dict(members)),
                    item.revision,
                    frozenset(joined_ids - left_ids),
                    frozenset(left_ids - joined_ids),
                    frozenset(updated_ids - joined_ids - left_ids),
                )
