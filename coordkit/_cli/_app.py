"""The ``coordkit`` command's frame: the click group, connection options, exit codes, signals.

Exit codes scripts can rely on (also in ``coordkit --help`` and the docs):

====  =========================================================================================
0     success; a wrapped command's own status otherwise (``lock``, ``elect``, ``join``, ``once``)
1     any other coordkit error
2     bad usage: unknown flag, malformed endpoint or name (click's convention)
3     conflict: ``config put --expect-revision`` found the key changed
4     not found: ``config get`` of a key or prefix with nothing under it; ``queue requeue/remove`` of no item
69    etcd unreachable (``EX_UNAVAILABLE``)
75    ownership lost: the lock, leadership, membership or a consumer's session was lost; the command was stopped
77    authentication failed or permission denied (``EX_NOPERM``)
124   ``--timeout`` passed before the lock was acquired or the reply came (as ``timeout(1)``)
126   the command is not executable; 127: not found (shell conventions)
128+N coordkit got signal N (SIGINT 130, SIGTERM 143); the command was stopped and released first
====  =========================================================================================
"""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn

import anyio
import click

from .. import (
    AuthenticationError,
    Backend,
    CoordkitError,
    EtcdBackend,
    OwnershipLostError,
    PostgresBackend,
    UnavailableError,
    __version__,
    check_name as check_recipe_name,
)
from ._child import CommandError
from ._output import error

EXIT_ERROR = 1
EXIT_CONFLICT = 3
EXIT_NOT_FOUND = 4
EXIT_UNAVAILABLE = 69
EXIT_LOST = 75
EXIT_NO_PERMISSION = 77
EXIT_TIMEOUT = 124

_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Failure(CoordkitError):
    """A command's own failure with the exit code it means (not found, conflict, timeout)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


_GLOBAL_CONNECTION = "coordkit.connection"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, "--version", prog_name="coordkit")
@click.pass_context
def cli(ctx: click.Context, /, **connection: Any) -> None:
    """Coordinate processes you cannot change: locks, leader election, membership, config, once() and queues.

    Every command but 'demo' talks to etcd: give the endpoints with --etcd URL[,URL...] or COORDKIT_ETCD.
    A wrapped command (after '--') runs in its own process group, with COORDKIT_FENCING_TOKEN set (lock, elect,
    join). When coordkit gets SIGINT/SIGTERM/SIGHUP, the group gets SIGTERM, then SIGKILL after --grace seconds,
    then the lock is released. When what protects the command is lost, SIGKILL comes by the time the lease may
    end on the server, whatever --grace says.

    \b
    Exit codes: the wrapped command's status, or
      1 error  2 usage  3 conflict  4 not found  69 etcd unreachable  75 ownership lost
      77 auth/permission  124 timeout  126/127 command not executable/found  128+N signal N
    """
    ctx.meta[_GLOBAL_CONNECTION] = connection


@dataclass(frozen=True)
class Connection:
    """How to reach the store (etcd, or PostgreSQL), from the command line and the environment."""

    endpoints: tuple[str, ...] | None
    postgres: str | None
    user: str | None
    password: str | None
    cacert_file: str | None
    cert_file: str | None
    key_file: str | None
    request_timeout: float | None

    def backend(self) -> Backend:
        """A client of the store: etcd (``--etcd``) or PostgreSQL (``--postgres``), not yet entered.

        Raises:
            click.UsageError: no store, both, or options that do not fit together (malformed URL, TLS files on
                http, a password without a user, etcd's credentials or TLS files with ``--postgres``).
        """
        if self.postgres:
            return self._postgres(self.postgres)
        if not self.endpoints:
            raise click.UsageError(
                "no store: pass --etcd URL[,URL...] (or set COORDKIT_ETCD), or --postgres DSN (COORDKIT_POSTGRES)"
            )
        username, password = self.user, self.password
        if username is not None and ":" in username:
            username, password = username.split(":", 1)  # etcdctl's --user NAME:PASSWORD wins
        if password is not None and username is None:
            raise click.UsageError("--password needs --user")
        if username is not None and password is None:
            raise click.UsageError("--user needs a password: --user NAME:PASSWORD, --password or COORDKIT_PASSWORD")
        try:
            return EtcdBackend(
                list(self.endpoints),
                username=username,
                password=password,
                ca_file=self.cacert_file,
                cert_file=self.cert_file,
                key_file=self.key_file,
                request_timeout=5.0 if self.request_timeout is None else self.request_timeout,
            )
        except (ValueError, TypeError) as exc:
            raise click.UsageError(str(exc)) from None
        except ImportError as exc:
            raise click.UsageError(str(exc)) from None

    def _postgres(self, dsn: str) -> Backend:
        if self.endpoints:
            raise click.UsageError("--etcd and --postgres name two stores: give one")
        given = [name for name, value in self._etcd_only() if value is not None]
        if given:
            raise click.UsageError(f"{', '.join(given)}: for etcd; with --postgres, credentials and TLS go in the DSN")
        timeout = 5.0 if self.request_timeout is None else self.request_timeout
        try:
            return PostgresBackend(dsn, request_timeout=timeout)
        except (ValueError, TypeError) as exc:
            raise click.UsageError(str(exc)) from None

    def _etcd_only(self) -> list[tuple[str, object]]:
        return [
            ("--user", self.user),
            ("--password", self.password),
            ("--cacert", self.cacert_file),
            ("--cert", self.cert_file),
            ("--key", self.key_file),
        ]


def _endpoints(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return tuple(url.strip() for url in value.split(",") if url.strip())


def _file(option: str, envvar: str, description: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    kind = click.Path(exists=True, dir_okay=False)
    return click.option(option, f"{option[2:]}_file", envvar=envvar, type=kind, help=f"{description} [env {envvar}]")


_CONNECTION_OPTIONS = (
    click.option(
        "--etcd",
        "endpoints",
        envvar="COORDKIT_ETCD",
        metavar="URL[,URL...]",
        callback=_endpoints,
        help="etcd endpoints, http:// or https:// [env COORDKIT_ETCD]",
    ),
    click.option(
        "--postgres",
        envvar="COORDKIT_POSTGRES",
        metavar="DSN",
        help="a PostgreSQL DSN instead of etcd (postgresql://user:password@host/db; needs coordkit[postgres])"
        " [env COORDKIT_POSTGRES]",
    ),
    click.option("--user", envvar="COORDKIT_USER", metavar="NAME[:PASSWORD]", help="[env COORDKIT_USER]"),
    click.option(
        "--password",
        envvar="COORDKIT_PASSWORD",
        metavar="TEXT",
        help="prefer the environment to the command line [env COORDKIT_PASSWORD]",
    ),
    _file("--cacert", "COORDKIT_CACERT", "CA bundle that signed the server's certificate"),
    _file("--cert", "COORDKIT_CERT", "client certificate, for servers that require one"),
    _file("--key", "COORDKIT_KEY", "the client certificate's private key"),
    click.option(
        "--request-timeout",
        type=click.FloatRange(min=0, min_open=True),
        help="seconds before one request to the store counts as failed [default: 5]",
    ),
)
_CONNECTION_FIELDS = (
    "endpoints",
    "postgres",
    "user",
    "password",
    "cacert_file",
    "cert_file",
    "key_file",
    "request_timeout",
)


def _with_options(command: Callable[..., None]) -> Callable[..., None]:
    for option in reversed(_CONNECTION_OPTIONS):
        command = option(command)
    for param in getattr(command, "__click_params__", ()):
        param.envvar = None  # the environment is read once, by the group: a flag after the subcommand wins
    return command


def connection_options(command: Callable[..., None]) -> Callable[..., None]:
    """Add the etcd connection options; the command receives them as one ``connection`` argument.

    They may also be given before the subcommand (``coordkit --etcd URL lock ...``, as etcdctl's global flags);
    given in both places, the subcommand's win.
    """

    @functools.wraps(command)
    def with_connection(**kwargs: Any) -> None:
        given = {field: kwargs.pop(field) for field in _CONNECTION_FIELDS}
        outer = click.get_current_context().find_root().meta.get(_GLOBAL_CONNECTION, {})
        merged = {field: given[field] if given[field] is not None else outer.get(field) for field in given}
        command(connection=Connection(**merged), **kwargs)

    return _with_options(with_connection)


for _option in _CONNECTION_OPTIONS:
    _option(cli)  # the connection options also go before the subcommand: they mutate the group


def check_name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A click callback: a recipe name must be non-empty UTF-8 text without NUL."""
    try:
        check_recipe_name(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


#: ``--ttl``: the session's lease TTL.
ttl_option = click.option(
    "--ttl",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="session lease TTL in seconds: how long a crashed holder keeps what it held",
)

#: ``--grace``: seconds between SIGTERM and SIGKILL when the wrapped command must stop.
grace_option = click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="seconds between SIGTERM and SIGKILL when coordkit is stopped (a lost lease: SIGKILL by its end)",
)

#: ``--json``: machine output.
json_option = click.option("--json", "as_json", is_flag=True, help="JSON output (one document per line)")


class Stopped(Exception):
    """coordkit got a stop signal: the command was stopped and what protected it released."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


# Scopes that a stop signal cancels instead of the whole program (see `stoppable`).
_stoppable: set[anyio.CancelScope] = set()
_received: list[int] = []


@contextmanager
def stoppable() -> Iterator[None]:
    """A block that SIGINT, SIGTERM or SIGHUP cancel, rather than the whole program; it then raises `Stopped`.

    What encloses the block goes on: a session keeps its lease alive while the command inside gets its full
    ``--grace`` to stop, then the lock is released (or the leadership resigned) as on any exit.
    """
    with anyio.CancelScope() as scope:
        _stoppable.add(scope)
        try:
            yield
        finally:
            _stoppable.discard(scope)
    if scope.cancelled_caught and _received:
        raise Stopped(_received[0])


def run(work: Callable[[], Awaitable[int]]) -> NoReturn:
    """Run ``work`` on asyncio and exit with its status, or with the code for what went wrong.

    SIGINT, SIGTERM and SIGHUP cancel the `stoppable` blocks of ``work`` if there are any, else all of it;
    a second signal cancels all of it. The exit status is then 128 + the signal number.
    """
    try:
        status = anyio.run(_until_signal, work, backend="asyncio")
    except KeyboardInterrupt:
        status = 128 + signal.SIGINT
    except BaseException as exc:
        failure = next(_leaves(exc))
        if isinstance(failure, SystemExit | click.exceptions.Exit | click.ClickException):
            raise failure from None
        if not isinstance(failure, Stopped):
            error(_describe(failure))
        status = _status(failure)
    sys.exit(status)


async def _until_signal(work: Callable[[], Awaitable[int]]) -> int:
    async with anyio.create_task_group() as tg:

        async def stop_on_signal() -> None:
            with anyio.open_signal_receiver(*_SIGNALS) as signals:
                async for signum in signals:
                    _received.append(signum)
                    if len(_received) > 1 or not _stoppable:
                        tg.cancel_scope.cancel()
                        return
                    for scope in _stoppable:
                        scope.cancel()

        tg.start_soon(stop_on_signal)
        status = await work()
        tg.cancel_scope.cancel()
    return 128 + _received[0] if _received else status


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    """The exception itself, or the leaves of an exception group (task groups wrap what their tasks raise)."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _status(exc: BaseException) -> int:
    match exc:
        case CommandError() | Failure():
            return exc.status
        case Stopped():
            return 128 + exc.signum
        case OwnershipLostError():
            return EXIT_LOST
        case AuthenticationError():
            return EXIT_NO_PERMISSION
        case UnavailableError():
            return EXIT_UNAVAILABLE
        case TimeoutError():
            return EXIT_TIMEOUT
        case _:
            return EXIT_ERROR


def _describe(exc: BaseException) -> str:
    if isinstance(exc, CoordkitError | CommandError | TimeoutError):
        return str(exc) or type(exc).__name__
    return f"unexpected {type(exc).__name__}: {exc}"
