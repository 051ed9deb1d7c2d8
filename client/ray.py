"""``RayExecutor``: each held instance is a named Ray actor running remote-exec's own server.

Design (see ``docs/executors.md`` for the measurements behind it): Ray places,
names, restarts and kills the actors; everything a call does is remote-exec's.
Each actor hosts the same ``Dispatcher`` as the daemon and the process
executor's child (``remote_exec.server.ray_host``) on a TCP port of its node,
behind a random token, and this executor keeps one protocol connection per
actor (``_ActorLink``, a ``RemoteExecutor``) and routes each call by instance
name. Order, callbacks, cancellation, streams with credit, invocations,
deadlines, events and the data codec are therefore the same code as on every
other executor, not a re-implementation on top of Ray tasks.

- Creating an instance starts an actor named after it in ``namespace``
  (detached by default, so it lives until deleted, like a daemon's instance,
  and other drivers can attach to it), waits until Ray placed it
  (``placement_timeout``: Ray would wait forever for a resource no node has),
  connects, and creates the instance there with the usual ``create_instance``.
- A second executor (another driver) attaches by name:
  ``ensure_remote_instance`` returns False when the instance is there.
- ``delete_remote_instance`` deletes the instance (its ``__exit__`` runs),
  then kills the actor.
- An actor process that dies fails the calls in flight with
  ``ConnectionLostError``; they are never sent again. With ``max_restarts``
  in ``ray_options`` Ray restarts the actor, which creates the instance again
  by itself; the next call reconnects.
- Executor-wide operations that need a remote side but no instance
  (``get_echo_clock``, ``sleep``, ``remote_import``, ``register_remote_class``)
  go to one anonymous actor of this executor, started on first use and
  killed when the executor stops.

Ray is imported only when an executor starts; ``import remote_exec`` never
imports it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import AsyncExitStack
from types import ModuleType
from typing import Any, Self

import anyio
from anyio.abc import TaskGroup, TaskStatus

from remote_exec.exceptions import (
    ConnectionLostError,
    DuplicateInstanceError,
    ExecutorStateError,
    RemoteExecConnectionError,
    SubscriberOverflowError,
    UnknownInstanceError,
)
from remote_exec.executor import (
    Executor,
    Invocation,
    RemoteStream,
    check_channel,
    check_observed_names,
    check_scope,
    config_of,
    module_name,
    resolve_call,
    submittable,
)
from remote_exec.invocations import InvocationInfo, InvocationStatus
from remote_exec.protocol import DEFAULT_WINDOW, Limits
from remote_exec.registry import InstanceRegistry, qualified_name
from remote_exec.runtime.handshake import send_token
from remote_exec.runtime.sockets import connect_tcp
from remote_exec.runtime.transport import FrameTransport, StreamTransport

from .remote import RemoteExecutor

__all__ = ["RayExecutor"]

logger = logging.getLogger("remote_exec.client")

_RETRY_PAUSE = 0.05  # between two asks of a restarting actor for its address
# How long deleting a connection-scoped instance may take when the executor
# stops (its running call, then its exit hook), past connecting.
_DELETE_GRACE = 10.0


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - the extra is installed in CI
        raise ImportError(
            "RayExecutor needs ray: install remote-exec with its extra, "
            "`pip install 'remote-exec[ray]'`"
        ) from exc
    return ray


@functools.cache
def _host_class() -> Any:
    """``InstanceHost`` as a Ray actor class (made once per process)."""
    from remote_exec.server.ray_host import InstanceHost

    return _import_ray().remote(InstanceHost)


def _host_spec(**fields: Any) -> dict[str, Any]:
    # Imported late: the server side's modules load only once Ray is used.
    from remote_exec.server.ray_host import host_spec

    return host_spec(**fields)


def _encode_arguments(value: Any, registry: InstanceRegistry) -> bytes:
    from remote_exec.server.ray_host import encode_arguments

    return encode_arguments(value, registry)


class _ActorLink(RemoteExecutor):
    """The protocol connection to one actor's server (TCP, token preamble)."""

    def __init__(
        self,
        instance: str,
        address: tuple[str, int, str, int],
        *,
        connect_timeout: float,
        codec: str,
        limits: Limits,
        window: int,
        registry: InstanceRegistry,
    ) -> None:
        super().__init__(
            codec=codec, limits=limits, window=window, registry=registry, init_context=False
        )
        self.instance = instance
        self.host, self.port, self._token, self.pid = address
        self.connect_timeout = connect_timeout

    def __repr__(self) -> str:
        return f"<Ray actor of {self.instance or '(executor)'!r} at {self.host}:{self.port}>"

    @property
    def usable(self) -> bool:
        return self.started and self._lost is None

    async def _connect(self) -> FrameTransport:
        where = f"the Ray actor of {self.instance!r} at {self.host}:{self.port}"
        try:
            with anyio.fail_after(self.connect_timeout):
                stream = await connect_tcp(self.host, self.port)
                try:
                    await send_token(stream, self._token)
                except BaseException:
                    await anyio.aclose_forcefully(stream)
                    raise
        except TimeoutError:
            raise RemoteExecConnectionError(
                f"{where} did not answer within {self.connect_timeout} s"
            ) from None
        except RemoteExecConnectionError:
            raise  # a refused token, a connection closed during the preamble
        except OSError as exc:
            raise RemoteExecConnectionError(f"cannot connect to {where}: {exc}") from exc
        return StreamTransport(
            stream, max_size=self.limits.max_message_size, max_buffers=self.limits.max_buffers
        )

    def _connection_lost(
        self, exc: ConnectionLostError, transport: FrameTransport | None = None
    ) -> None:
        if self._lost is None and "Ray actor" not in str(exc):
            exc = ConnectionLostError(
                f"lost the connection to the Ray actor of {self.instance!r} (process "
                f"{self.pid} on {self.host}): it died, was killed or is restarting ({exc})"
            )
        super()._connection_lost(exc, transport)


class _Host:
    """One actor: its handle, and the link to it (made again after a loss)."""

    __slots__ = ("actor", "created", "link", "lock", "name", "retired", "scope")

    def __init__(self, name: str, actor: Any, created: bool, scope: str = "server") -> None:
        self.name = name
        self.actor = actor
        self.created = created  # by this executor (so it may kill it on failure)
        self.scope = scope  # "connection": deleted and killed when the executor stops
        self.link: _ActorLink | None = None
        self.retired: anyio.Event | None = None  # set: the link's task stops it
        self.lock = anyio.Lock()

    def retire(self) -> None:
        if self.retired is not None:
            self.retired.set()
        self.link = self.retired = None


class RayExecutor(Executor):
    """Runs each held instance in a named Ray actor (see the module docstring).

    Args:
        address: the Ray cluster: None starts or joins a local Ray (``ray.init()``),
            ``"auto"`` or ``"ray://host:port"`` joins a cluster. Ignored when
            Ray is already initialised in this process.
        namespace: the Ray namespace the instances' actors are named in.
        init_options: more keyword arguments for ``ray.init``.
        placement_timeout: seconds a new instance's actor may take to be placed
            and started; past it the actor is killed and creating the instance
            raises ``TimeoutError`` (Ray itself would wait forever for a
            resource no node has). Also bounds waiting for a restarting actor.
        connect_timeout: seconds to connect to an actor's server.
        detached: start actors with ``lifetime="detached"``: an instance lives
            until deleted, whichever driver made it (a ``ray_options``
            ``lifetime`` wins).
        bind: the address each actor's server listens on (default: its node's
            IP address, which the client connects to).
        backend: "asyncio" or "trio": the event loop in the actors.
        codec, limits, window, registry, init_context: see ``RemoteExecutor``.

    Placement: ``ray_options`` (a dict given to Ray's ``.options()``:
    ``num_cpus``, ``num_gpus``, ``resources``, ``scheduling_strategy``,
    ``max_restarts``...) as a keyword of ``remote_instance``,
    ``create_remote_instance`` and ``ensure_remote_instance``, over the
    class's defaults in a ``_ray_options_`` attribute.
    """

    is_remote = True

    def __init__(
        self,
        address: str | None = None,
        *,
        namespace: str = "remote-exec",
        init_options: Mapping[str, Any] | None = None,
        placement_timeout: float = 60.0,
        connect_timeout: float = 10.0,
        detached: bool = True,
        bind: str | None = None,
        backend: str = "asyncio",
        codec: str = "msgpack",
        limits: Limits | None = None,
        window: int = DEFAULT_WINDOW,
        registry: InstanceRegistry | None = None,
        init_context: bool = True,
    ) -> None:
        super().__init__(registry=registry, init_context=init_context)
        if importlib.util.find_spec("ray") is None:
            raise ImportError(
                "RayExecutor needs ray: install remote-exec with its extra, "
                "`pip install 'remote-exec[ray]'`"
            )
        if backend not in ("asyncio", "trio"):
            raise ValueError(f"backend must be 'asyncio' or 'trio', not {backend!r}")
        if not namespace:
            raise ValueError("namespace must be a non-empty string")
        self.limits = limits or Limits()
        if not 1 <= window <= self.limits.max_credit:
            raise ValueError(f"window must be between 1 and {self.limits.max_credit}")
        self.address = address
        self.namespace = namespace
        self.init_options = dict(init_options or {})
        self.placement_timeout = placement_timeout
        self.connect_timeout = connect_timeout
        self.detached = detached
        self.bind = bind
        self.backend = backend
        self.codec = codec
        self.window = window
        self._hosts: dict[str, _Host] = {}
        self._home: _Host | None = None
        self._home_lock = anyio.Lock()
        self._setup: list[tuple[str, list[Any]]] = []  # replayed on every new actor
        self._channels: set[_Channel] = set()
        self._task_group: TaskGroup | None = None
        self._exit_stack: AsyncExitStack | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.address!r}, namespace={self.namespace!r})"

    # -- lifecycle -------------------------------------------------------------
    async def _start(self) -> None:
        await anyio.to_thread.run_sync(self._init_ray)
        stack = AsyncExitStack()
        self._task_group = await stack.enter_async_context(anyio.create_task_group())
        self._exit_stack = stack

    def _init_ray(self) -> None:
        ray = _import_ray()
        if not ray.is_initialized():
            ray.init(address=self.address, **self.init_options)
        _host_class()

    async def _stop(self) -> None:
        for channel in list(self._channels):
            channel.end()
        hosts, self._hosts = list(self._hosts.values()), {}
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for host in hosts:
                    if host.scope == "connection" and host.created:
                        tg.start_soon(self._end_scope, host)
        for host in hosts:
            host.retire()
        home, self._home = self._home, None
        if home is not None:
            home.retire()
            await self._kill(home)  # shielded
        stack, self._exit_stack = self._exit_stack, None
        if stack is not None:
            await stack.aclose()  # waits for the links' tasks to stop them
        self._task_group = None

    async def _end_scope(self, host: _Host) -> None:
        """The executor stops: a connection-scoped instance goes. Its link is
        retired first (calls in flight and queued fail at once, as on every
        executor), then a last connection deletes it (its exit hook runs in
        the actor, after the call still running there) and its actor is killed."""
        host.retire()
        try:
            address = await self._in_thread(
                self._actor_address, host.actor, f"the Ray actor of {host.name!r}", 10.0
            )
            link = _ActorLink(
                host.name,
                address,
                connect_timeout=self.connect_timeout,
                codec=self.codec,
                limits=self.limits,
                window=self.window,
                registry=InstanceRegistry(),
            )
            with anyio.fail_after(self.connect_timeout + _DELETE_GRACE):
                async with link:
                    await link._request("", "delete_instance", [host.name])
        except Exception as exc:  # noqa: BLE001 - killed below either way
            logger.warning("could not delete %r before killing its actor: %s", host.name, exc)
        finally:
            await self._kill(host)
            if host.name in self.registry.instance_names():
                self.registry.remove_instance(host.name)

    # -- Ray calls, off the event loop -----------------------------------------
    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await anyio.to_thread.run_sync(functools.partial(fn, *args), abandon_on_cancel=True)

    def _actor_address(self, actor: Any, what: str, timeout: float) -> tuple[str, int, str, int]:
        """Ask ``actor`` where its server listens, waiting while Ray places or
        restarts it (in a thread). Raises ``TimeoutError`` past ``timeout``."""
        ray = _import_ray()
        deadline = time.monotonic() + timeout
        while True:
            ref = actor.address.remote()
            ready, _ = ray.wait([ref], timeout=max(deadline - time.monotonic(), 0.0))
            if not ready:
                ray.cancel(ref)
                raise TimeoutError(f"{what} was not ready within {timeout:g} s")
            try:
                host, port, token, pid = ray.get(ref)
                return str(host), int(port), str(token), int(pid)
            except ray.exceptions.ActorUnavailableError:  # restarting: ask again
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{what} was not back within {timeout:g} s") from None
                time.sleep(_RETRY_PAUSE)
            except ray.exceptions.RayActorError as exc:
                raise ConnectionLostError(f"{what} is gone: {_ray_reason(exc)}") from None

    async def _kill(self, host: _Host) -> None:
        """Kill ``host``'s actor (no restart) and, if named, wait until Ray
        released its name (so that it can be created again at once)."""
        ray = _import_ray()

        def kill() -> None:
            try:
                ray.kill(host.actor, no_restart=True)
            except ValueError:  # already gone
                return
            if not host.name:
                return
            deadline = time.monotonic() + 10.0
            while time.monotonic() < deadline:
                try:
                    found = ray.get_actor(host.name, namespace=self.namespace)
                except ValueError:
                    return
                if found._actor_id != host.actor._actor_id:
                    return  # someone made a new one meanwhile
                time.sleep(0.01)

        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(kill)

    # -- links -----------------------------------------------------------------
    async def _link(self, host: _Host, wait: float | None = None) -> _ActorLink:
        """The usable link to ``host``'s actor, connecting (again) if needed."""
        link = host.link
        if link is not None and link.usable:
            return link
        async with host.lock:
            link = host.link
            if link is not None and link.usable:
                return link
            host.retire()
            self.check_running()
            what = f"the Ray actor of instance {host.name!r}" if host.name else "a Ray actor"
            address = await self._in_thread(
                self._actor_address,
                host.actor,
                what,
                self.placement_timeout if wait is None else wait,
            )
            link = _ActorLink(
                host.name,
                address,
                connect_timeout=self.connect_timeout,
                codec=self.codec,
                limits=self.limits,
                window=self.window,
                registry=self.registry,
            )
            retired = anyio.Event()
            assert self._task_group is not None
            await self._task_group.start(self._hold_link, link, retired)
            host.link, host.retired = link, retired
            return link

    async def _hold_link(
        self, link: _ActorLink, retired: anyio.Event, *, task_status: TaskStatus[None]
    ) -> None:
        """Own ``link`` in a task of this executor's group: it is started and
        stopped in one task, whichever task first needed it."""
        await link.start()
        try:
            task_status.started()
            await retired.wait()
        finally:
            # Not in a scope of ours: the link's task group, entered in
            # ``start`` at this level, must be exited at this level too.
            try:
                await link.stop()
            except Exception:
                logger.exception("stopping %r failed", link)

    def _host_of(self, obj: Any) -> _Host:
        name = self.registry.require_name(obj)
        host = self._hosts.get(name)
        if host is None:
            raise UnknownInstanceError(f"no instance named {name!r} is held by this executor")
        return host

    async def _link_of(self, obj: Any) -> _ActorLink:
        host = self._host_of(obj)
        link = host.link
        if link is not None and link.usable:
            return link
        return await self._link(host)

    async def _prepare(self, link: _ActorLink) -> None:
        """What a new actor gets before its instance: the modules imported and
        classes registered through this executor, and the open event channels."""
        for op, args in self._setup:
            await link._request("", op, args)
        for channel in list(self._channels):
            await channel.attach(link)

    # -- instances -------------------------------------------------------------
    async def create_remote_instance(
        self,
        obj: Any,
        name: str,
        *args: Any,
        ray_options: Mapping[str, Any] | None = None,
        scope: str = "server",
        **kwargs: Any,
    ) -> None:
        """Create ``obj``'s twin as ``name`` in a new Ray actor (placed with
        ``ray_options`` over the class's ``_ray_options_``).

        ``scope="connection"``: the instance is deleted (its exit hook runs)
        and its actor killed when this executor stops; its actor is not
        detached (Ray kills it with this driver if the driver dies first).

        Raises:
            DuplicateInstanceError: an instance (an actor) of that name exists.
            TimeoutError: Ray did not place and start the actor within
                ``placement_timeout`` (e.g. no node has the resources asked for).
        """
        await self._create(obj, name, args, kwargs, ray_options, exist_ok=False, scope=scope)

    async def ensure_remote_instance(
        self,
        obj: Any,
        name: str,
        *args: Any,
        ray_options: Mapping[str, Any] | None = None,
        scope: str = "server",
        **kwargs: Any,
    ) -> bool:
        """Like ``create_remote_instance``, but attach to the instance if its
        actor exists already (made by this or another driver): False then
        (its scope stays what its creator said)."""
        return await self._create(obj, name, args, kwargs, ray_options, exist_ok=True, scope=scope)

    async def _create(
        self,
        obj: Any,
        name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        ray_options: Mapping[str, Any] | None,
        *,
        exist_ok: bool,
        scope: str = "server",
    ) -> bool:
        self.check_running()
        check_scope(scope)
        if not isinstance(name, str) or not name:
            raise ValueError("an instance name must be a non-empty string")
        held = self._hosts.get(name)
        if held is not None:
            if not exist_ok:
                raise DuplicateInstanceError(f"an instance named {name!r} already exists")
            link = await self._link(held)
            return await link._create(obj, name, args, kwargs, exist_ok=True)
        module, qualname = qualified_name(type(obj))
        main_path = None
        if module == "__main__":
            main_path = getattr(sys.modules["__main__"], "__file__", None)
            if main_path is not None and main_path.startswith("<"):
                main_path = None
        spec = _host_spec(
            name=name,
            module=module,
            qualname=qualname,
            main_path=main_path,
            arguments=_encode_arguments([list(args), kwargs, config_of(obj)], self.registry),
            backend=self.backend,
            bind=self.bind,
            limits=dataclasses.asdict(self.limits),
        )
        options = {**getattr(type(obj), "_ray_options_", {}), **(ray_options or {})}
        if scope == "connection":  # fate-shared with this driver, not detached
            options["lifetime"] = None
        actor, created = await self._in_thread(self._make_actor, name, spec, options, exist_ok)
        host = _Host(name, actor, created, scope)
        try:
            try:
                link = await self._link(host)
            except TimeoutError as exc:
                raise TimeoutError(
                    f"{exc}: Ray could not place it, or start its process (asked for "
                    f"{_resources(options)}; the cluster has {await self._cluster()}). "
                    "Check its ray_options, or raise placement_timeout"
                ) from None
            await self._prepare(link)
            made = await link._create(obj, name, args, kwargs, exist_ok=True)
        except BaseException:
            host.retire()
            if created:
                await self._kill(host)
            raise
        self._hosts[name] = host
        return created or made

    def _make_actor(
        self, name: str, spec: dict[str, Any], options: dict[str, Any], exist_ok: bool
    ) -> tuple[Any, bool]:
        """(the actor named ``name``, whether this call created it); in a thread."""
        ray = _import_ray()
        if exist_ok:
            try:
                return ray.get_actor(name, namespace=self.namespace), False
            except ValueError:
                pass
        options = {"lifetime": "detached" if self.detached else None, **options}
        try:
            actor = _host_class().options(name=name, namespace=self.namespace, **options)
            return actor.remote(spec), True
        except ray.exceptions.ActorAlreadyExistsError:
            if exist_ok:  # another driver was quicker
                return ray.get_actor(name, namespace=self.namespace), False
            raise DuplicateInstanceError(
                f"an instance named {name!r} already exists (a Ray actor in namespace "
                f"{self.namespace!r})"
            ) from None

    async def _cluster(self) -> dict[str, float]:
        ray = _import_ray()
        resources: dict[str, float] = await self._in_thread(ray.cluster_resources)
        return {k: v for k, v in resources.items() if not k.startswith("node:")}

    async def delete_remote_instance(self, obj: Any) -> None:
        """Delete the instance (its lifecycle exit runs), then kill its actor."""
        self.check_running()
        host = self._host_of(obj)
        try:
            link = await self._link(host)
            await link.delete_remote_instance(obj)
            if self._channels:
                # The "delete" event left before the answer to a later call.
                await link.get_echo_clock()
        except RemoteExecConnectionError:
            pass  # the actor is gone already: killing it below is all there is to do
        finally:
            self._hosts.pop(host.name, None)
            if self.registry.name_of(obj) == host.name:
                self.registry.remove_instance(host.name)
            host.retire()
            await self._kill(host)

    async def get_remote_objects(self) -> list[str]:
        """The instances of this executor's namespace (the named actors there,
        whichever driver made them)."""
        self.check_running()
        ray = _import_ray()
        found = await self._in_thread(ray.util.list_named_actors, True)
        return sorted(a["name"] for a in found if a.get("namespace") == self.namespace)

    # -- calls -----------------------------------------------------------------
    async def execute(
        self,
        obj: Any,
        fn: Callable[..., Any] | str,
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        callback: Callable[..., Any] | str | None = None,
    ) -> Any:
        self.check_running()
        link = await self._link_of(obj)
        return await link.execute(obj, fn, args, kwargs, callback)

    def execute_generator(
        self,
        obj: Any,
        gen: Callable[..., Any] | str,
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        callback: Callable[..., Any] | str | None = None,
    ) -> RemoteStream:
        self.check_running()
        host = self._host_of(obj)
        link = host.link
        if link is not None and link.usable:
            return link.execute_generator(obj, gen, args, kwargs, callback)
        resolve_call(obj, gen, callback, generator=True)  # its errors now, as usual
        call = (obj, gen, list(args), kwargs, callback)

        async def opener() -> RemoteStream:
            return (await self._link(host)).execute_generator(*call)

        return _LaterStream(opener)

    # -- invocations -----------------------------------------------------------
    async def _all_links(self) -> list[_ActorLink]:
        links: list[_ActorLink] = []
        for host in list(self._hosts.values()):
            try:
                links.append(await self._link(host))
            except (RemoteExecConnectionError, TimeoutError):
                continue  # its actor is gone or not back: it knows nothing now
        return links

    async def list_invocations(
        self,
        *,
        instance: Any = None,
        method: str | None = None,
        status: str | InvocationStatus | None = None,
    ) -> list[InvocationInfo]:
        """The invocations of every instance of this executor (each actor keeps
        its own), oldest first."""
        self.check_running()
        name = self._instance_name(instance)
        if name is not None:
            host = self._hosts.get(name)
            links = [await self._link(host)] if host is not None else []
        else:
            links = await self._all_links()
        found: list[InvocationInfo] = []
        for link in links:
            found += await link.list_invocations(instance=name, method=method, status=status)
        return sorted(found, key=lambda info: info.requested_at)

    async def _links_for_id(self, invocation_id: str) -> list[_ActorLink]:
        """The links to ask about ``invocation_id``: the one whose session made
        it first (an id is ``session-n``), then every other."""
        links = await self._all_links()
        session = str(invocation_id).rpartition("-")[0]
        return sorted(links, key=lambda link: link.session != session)

    async def _by_id(self, op: str, invocation_id: str) -> Any:
        """``op`` on the link that knows ``invocation_id``; the error of the
        link that made it (or else of the first asked) when none does."""
        refusal: LookupError | None = None
        for link in await self._links_for_id(invocation_id):
            try:
                return await getattr(link, op)(invocation_id)
            except LookupError as exc:
                if str(invocation_id).rpartition("-")[0] == link.session:
                    raise  # the id is this link's: no other can know it
                refusal = refusal or exc
        if refusal is not None:
            raise refusal
        raise LookupError(f"unknown invocation {invocation_id!r}: this executor holds no instance")

    async def get_invocation(self, invocation_id: str) -> InvocationInfo:
        self.check_running()
        info: InvocationInfo = await self._by_id("get_invocation", invocation_id)
        return info

    async def cancel_invocation(self, invocation_id: str) -> InvocationInfo:
        self.check_running()
        info: InvocationInfo = await self._by_id("cancel_invocation", invocation_id)
        return info

    async def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Invocation:
        """Submit through the instance's actor link; the handle is that link's
        (after the actor's loss, ``result()`` raises ``ConnectionLostError``;
        ``executor.invocation(id)`` finds it again on a restarted actor's link)."""
        self.check_running()
        obj, _ = submittable(fn)
        return await (await self._link_of(obj)).submit(fn, *args, **kwargs)

    async def invocation_result(self, invocation_id: str) -> Any:
        self.check_running()
        return await self._by_id("invocation_result", invocation_id)

    def follow_log(self, invocation_id: str) -> RemoteStream:
        self.check_running()

        async def opener() -> RemoteStream:
            for link in await self._links_for_id(invocation_id):
                try:
                    await link.get_invocation(invocation_id)
                except LookupError:
                    continue
                return link.follow_log(invocation_id)
            raise LookupError(f"no instance of this executor knows invocation {invocation_id!r}")

        return _LaterStream(opener)

    # -- config and properties -------------------------------------------------
    async def get_remote_object_config(self, obj: Any | None) -> dict[str, Any]:
        self.check_running()
        if obj is not None:
            return await (await self._link_of(obj)).get_remote_object_config(obj)
        everything: dict[str, Any] = {}
        for link in await self._all_links():
            everything.update(await link.get_remote_object_config(None))
        return everything

    async def get_remote_object_property_data(
        self, obj: Any, names: Iterable[str]
    ) -> dict[str, Any]:
        self.check_running()
        return await (await self._link_of(obj)).get_remote_object_property_data(obj, names)

    # -- executor-wide operations: this executor's own actor ------------------
    async def _home_link(self) -> _ActorLink:
        self.check_running()
        if self._home is None:
            async with self._home_lock:
                if self._home is None:
                    spec = _host_spec(
                        name=None,
                        module=None,
                        qualname=None,
                        main_path=None,
                        arguments=b"",
                        backend=self.backend,
                        bind=self.bind,
                        limits=dataclasses.asdict(self.limits),
                    )

                    def make() -> Any:
                        options = _host_class().options(namespace=self.namespace, num_cpus=0)
                        return options.remote(spec)

                    self._home = _Host("", await self._in_thread(make), True)
        return await self._link(self._home)

    async def get_echo_clock(self) -> tuple[int, int, int]:
        """The clock of this executor's own actor (started on first use)."""
        return await (await self._home_link()).get_echo_clock()

    async def sleep(self, duration: float | None = None, deadline: float | None = None) -> int:
        """Sleep in this executor's own actor; ``deadline`` is on its clock."""
        return await (await self._home_link()).sleep(duration, deadline)

    async def remote_import(self, module: str | ModuleType) -> None:
        """Import ``module`` in this executor's own actor (an ``ImportError``
        says it cannot be), in every actor of its instances, and in those it
        starts later (for the coders a module registers)."""
        name = module_name(module)
        await (await self._home_link()).remote_import(name)
        await self._everywhere("import_module", [name])

    async def register_remote_class(self, cls: type) -> None:
        self.registry.register_class(cls)
        await (await self._home_link()).register_remote_class(cls)
        await self._everywhere("register_class", list(qualified_name(cls)))

    async def _everywhere(self, op: str, args: list[Any]) -> None:
        self._setup.append((op, args))
        for link in await self._all_links():
            await link._request("", op, args)

    def get_channel_from_remote(self, name: str, channel: str) -> RemoteStream:
        """Events of this executor's instances ("" for all), including those
        it creates or attaches to while the channel is open."""
        self.check_running()
        check_channel(name, channel)
        return _Channel(self, name, channel)

    def observe(self, obj: Any, names: Iterable[str]) -> RemoteStream:
        """Changes of the attributes ``names`` of ``obj``'s twin, through its
        actor's link (see ``Executor.observe``); the stream fails with
        ``ConnectionLostError`` if the actor dies.

        Raises:
            NotAllowedError: a name is private or not an identifier.
        """
        self.check_running()
        wanted = check_observed_names(names)
        host = self._host_of(obj)
        link = host.link
        if link is not None and link.usable:
            return link.observe(obj, wanted)

        async def opener() -> RemoteStream:
            return (await self._link(host)).observe(obj, wanted)

        return _LaterStream(opener)


class _LaterStream(RemoteStream):
    """A stream that needs an await before it can be opened (a link to make
    again, an invocation to find): ``opener()`` gives the real one."""

    def __init__(self, opener: Callable[[], Awaitable[RemoteStream]]) -> None:
        self._opener = opener
        self._inner: RemoteStream | None = None
        self._closed = False

    async def _open(self) -> RemoteStream:
        if self._inner is None:
            self._inner = await self._opener()
            await self._inner.__aenter__()
        return self._inner

    async def __aenter__(self) -> Self:
        if not self._closed:
            await self._open()
        return self

    async def __anext__(self) -> Any:
        if self._closed:
            raise StopAsyncIteration
        return await (await self._open()).__anext__()

    async def aclose(self) -> None:
        self._closed = True
        if self._inner is not None:
            await self._inner.aclose()


class _Channel(RemoteStream):
    """The events of several actors as one stream: one subscription per actor
    link, each pumped into one bounded queue (a full queue stops the pumps, so
    the actors' own subscriber bounds apply)."""

    def __init__(self, executor: RayExecutor, name: str, channel: str) -> None:
        self._executor = executor
        self.name = name
        self.channel = channel
        self._send, self._receive = anyio.create_memory_object_stream[dict[str, Any]](
            executor.window
        )
        self._scopes: set[anyio.CancelScope] = set()
        self._error: BaseException | None = None
        self._opened = False
        self._closed = False

    async def _open(self) -> None:
        if self._opened or self._closed:
            return
        self._opened = True
        executor = self._executor
        executor._channels.add(self)
        hosts = list(executor._hosts.values())
        for host in hosts:
            if not self.name or host.name == self.name:
                try:
                    await self.attach(await executor._link(host))
                except (RemoteExecConnectionError, TimeoutError):
                    continue

    async def attach(self, link: _ActorLink) -> None:
        """Subscribe on ``link`` (sent before this returns: a later call on it
        publishes its events to this subscription)."""
        if self._closed or (self.name and link.instance != self.name):
            return
        task_group = self._executor._task_group
        assert task_group is not None
        await task_group.start(self._pump, link)

    async def _pump(self, link: _ActorLink, *, task_status: TaskStatus[None]) -> None:
        stream = link.get_channel_from_remote(self.name, self.channel)
        try:
            await stream.__aenter__()  # the subscription is sent
        except (RemoteExecConnectionError, ExecutorStateError):
            task_status.started()  # that actor is gone: nothing to pump
            return
        task_status.started()
        with anyio.CancelScope() as scope:
            self._scopes.add(scope)
            if self._closed:
                scope.cancel()
            try:
                async for event in stream:
                    await self._send.send(event)
            except SubscriberOverflowError as exc:
                self._error = exc
                self.end()
            except (
                RemoteExecConnectionError,
                ExecutorStateError,
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
            ):
                pass  # that actor is gone (deleted, or died): its events ended
            finally:
                self._scopes.discard(scope)
                await stream.aclose()

    def end(self) -> None:
        """Stop every pump; the consumer gets what is queued, then the end."""
        self._closed = True
        self._executor._channels.discard(self)
        for scope in list(self._scopes):
            scope.cancel()
        self._send.close()

    async def __aenter__(self) -> Self:
        await self._open()
        return self

    async def __anext__(self) -> dict[str, Any]:
        await self._open()
        try:
            return await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            if self._error is not None:
                raise self._error from None
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        self.end()
        self._receive.close()


def _resources(options: Mapping[str, Any]) -> str:
    asked = {
        key: options[key]
        for key in ("num_cpus", "num_gpus", "resources", "memory", "scheduling_strategy")
        if key in options
    }
    return str(asked) if asked else "no particular resources"


def _ray_reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
