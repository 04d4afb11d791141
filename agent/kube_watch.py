"""The Kubernetes watch boundary (the official ``kubernetes`` client, synchronous).

Each watched resource (pods, nodes, events) has one thread in a bounded pool, so the event
loop never blocks on the API server. A thread lists once, then watches from the list's
``resourceVersion`` with bookmarks and a server-side ``timeout_seconds``; when a watch ends
(timeout, dropped connection) it resumes from the last ``resourceVersion`` it saw, so
nothing is lost and nothing repeats. When the server answers ``410 Gone`` (the version was
compacted away) it re-lists, and :func:`agent.kube_signals.sync` turns the full state into
transitions only. Objects cross into the event loop as plain JSON dicts; the client's
model classes and exceptions never leave this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import orjson
import urllib3
from kubernetes import client
from kubernetes import config as _config
from kubernetes.client.exceptions import ApiException

from agent.detector import Publisher, publish_refusing
from agent.errors import AgentError, plain, task_failure
from agent.kube_signals import KubeRules, KubeState, refresh, step, sync, tick
from agent.metrics import Metrics
from agent.models import Anomaly, utcnow
from agent.settings import Settings
from handlers.kube import api_client

log = logging.getLogger(__name__)

config: Any = _config  # the client's loaders are untyped

RESOURCES = ("pods", "nodes", "events")
Item = tuple[str, str, Any]  # (resource, "SYNC" | "ADDED" | "MODIFIED" | "DELETED", payload)
# Watch events handled, and their anomalies published, as one batch at the most: a re-list
# of a large cluster queues thousands at once.
DRAIN_AT_MOST = 1000
# Watch events queued at the most before the watch threads wait (see KubeWatcher.start).
QUEUE_BOUND = 10_000


class Gone(Exception):
    """The watch's resourceVersion is too old (410): list again."""


class ResourceWatch:
    """List-then-watch loop of one resource; runs in a worker thread."""

    def __init__(
        self,
        resource: str,
        list_fn: Callable[..., Any],
        *,
        timeout: float,
        emit: Callable[[Item], None],
        stopping: threading.Event,
        page_size: int = 500,
    ) -> None:
        self.resource = resource
        self.list_fn = list_fn
        self.page_size = page_size
        self.timeout = max(1, int(timeout))
        self.emit = emit
        self.stopping = stopping
        self.resource_version: str | None = None
        self.stats: Counter[str] = Counter()  # lists, watches, gone, errors
        self._resp: Any = None

    def run(self) -> None:
        backoff = 0.5
        while not self.stopping.is_set():
            try:
                if self.resource_version is None:
                    self._list()
                self._watch()
                backoff = 0.5
            except Gone:
                self.stats["gone"] += 1
                log.info(
                    "%s: resourceVersion %s gone; re-listing", self.resource, self.resource_version
                )
                self.resource_version = None
            except (ApiException, urllib3.exceptions.HTTPError, OSError, ValueError) as err:
                if self.stopping.is_set():
                    return
                self.stats["errors"] += 1
                # (An ApiException's text is lines, the API server's reply body among them.)
                log.warning(
                    "%s: watch failed (%s); retrying in %.1fs",
                    self.resource,
                    plain(str(err)),
                    backoff,
                )
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    def stop(self) -> None:
        resp = self._resp
        if resp is not None:
            with contextlib.suppress(Exception):
                resp.shutdown()  # unblocks the thread's read at once

    def _list(self) -> None:
        """List in pages of ``page_size`` (limit/continue), so a large cluster is never one
        huge response; every page comes from the same snapshot, whose resourceVersion the
        watch resumes from. An expired continue token is a 410: the caller re-lists."""
        items: list[Any] = []
        token = ""
        while True:
            resp = self.list_fn(
                limit=self.page_size,
                **({"_continue": token} if token else {}),
                _preload_content=False,
                _request_timeout=(5, 60),
            )
            try:
                _check(resp)
                doc = orjson.loads(resp.data)
            finally:
                resp.release_conn()
            self.stats["pages"] += 1
            page, meta = _list_page(doc)
            items.extend(page)
            token = meta.get("continue") or ""
            if not token:
                break
            if self.stopping.is_set():
                return
        self.stats["lists"] += 1
        self.resource_version = str(meta["resourceVersion"])
        self.emit((self.resource, "SYNC", items))

    def _watch(self) -> None:
        resp = self.list_fn(
            watch=True,
            resource_version=self.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=self.timeout,
            _preload_content=False,
            _request_timeout=(5, self.timeout + 10),
        )
        self._resp = resp
        self.stats["watches"] += 1
        try:
            if self.stopping.is_set():  # stop() ran before the response was ours to shut
                return
            _check(resp)
            buf = b""
            for chunk in resp.stream(64 * 1024, decode_content=True):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line.strip():
                        self._event(orjson.loads(line))
                if self.stopping.is_set():
                    return
        finally:
            self._resp = None
            resp.release_conn()

    def _event(self, ev: Any) -> None:
        # A malformed line is a ValueError naming the field: the watch retries. Any other
        # error ended the watch thread, and the detector with it.
        if not isinstance(ev, dict):
            raise ValueError(f"watch event: expected an object, got {type(ev).__name__}")
        kind, obj = ev.get("type"), ev.get("object") or {}
        if not isinstance(obj, dict) or not isinstance(obj.get("metadata") or {}, dict):
            where = "object" if not isinstance(obj, dict) else "object.metadata"
            raise ValueError(f"watch event {kind}: {where}: expected an object")
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Gone(obj.get("message", ""))
            raise ValueError(f"watch error {obj.get('code')}: {obj.get('message')}")
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if rv:
            self.resource_version = str(rv)
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            self.emit((self.resource, kind, obj))


def _list_page(doc: Any) -> tuple[list[Any], dict[str, Any]]:
    """A list reply's items and metadata, or ValueError naming the field (the watch
    retries): a KeyError or AttributeError ended the watch thread, and the detector."""
    if not isinstance(doc, dict):
        raise ValueError(f"list reply: expected an object, got {type(doc).__name__}")
    items, meta = doc.get("items") or [], doc.get("metadata")
    if not isinstance(items, list):
        raise ValueError(f"list reply: items: expected a list, got {type(items).__name__}")
    if not isinstance(meta, dict):
        raise ValueError(f"list reply: metadata: expected an object, got {type(meta).__name__}")
    if not meta.get("continue") and not meta.get("resourceVersion"):
        raise ValueError("list reply: metadata.resourceVersion: missing")
    return items, meta


def _check(resp: Any) -> None:
    status = int(getattr(resp, "status", 200))
    if status == 410:
        raise Gone(f"HTTP 410: {resp.data[:200]!r}")
    if not 200 <= status < 300:
        raise ValueError(f"HTTP {status}: {resp.data[:200]!r}")


class KubeWatcher:
    """Watches pods, nodes and events; publishes the anomalies they imply."""

    def __init__(
        self,
        settings: Settings,
        *,
        publish: Publisher,
        topic: str,
        metrics: Metrics,
        api: Any | None = None,
        clock: Callable[[], datetime] = utcnow,
        tick_interval: float = 5.0,
        queue_bound: int = QUEUE_BOUND,
    ) -> None:
        k = settings.detectors.kubernetes
        self.settings = settings
        self.rules = KubeRules(
            cluster=settings.agent.cluster,
            event_reasons=frozenset(k.event_reasons),
            restart_threshold=k.restart_threshold,
            restart_window=k.restart_window,
            refresh_every=max(1.0, settings.correlation.resolve_timeout / 3),
        )
        self.publisher = publish
        self.topic = topic
        self.metrics = metrics
        self.clock = clock
        self.tick_interval = tick_interval
        self.state = KubeState()
        self._api = api
        self._owns_api = api is None
        self._stopping = threading.Event()
        self._pool: ThreadPoolExecutor | None = None
        self._queue: asyncio.Queue[Item] = asyncio.Queue()
        # Free places in the queue, taken by the watch threads and given back as the events
        # are handled (the queue itself cannot make a thread wait).
        self._room = threading.BoundedSemaphore(queue_bound)
        self._tasks: list[asyncio.Future[Any]] = []
        self.watches: dict[str, ResourceWatch] = {}
        self.synced = asyncio.Event()  # every resource listed once and processed
        self._synced: set[str] = set()

    async def start(self) -> None:
        if self._tasks:
            return
        if self._api is None:
            self._api = await asyncio.to_thread(
                functools.partial(api_client, setting="detectors.kubernetes.kubeconfig"),
                self.settings.detectors.kubernetes.kubeconfig,
            )
        core: Any = client.CoreV1Api(self._api)
        fns = {
            "pods": core.list_pod_for_all_namespaces,
            "nodes": core.list_node,
            "events": core.list_event_for_all_namespaces,
        }
        loop = asyncio.get_running_loop()
        self._stopping.clear()
        self._pool = ThreadPoolExecutor(max_workers=len(fns), thread_name_prefix="kube-watch")

        def emit(item: Item) -> None:
            # A watch thread waits while the queue is full. Publishing stops while Kafka is
            # down, and the queue grew with every event of a busy cluster until the process
            # ran out of memory. A watch not read is ended by the API server, and resumes
            # from its last version (or re-lists): nothing is lost.
            while not self._room.acquire(timeout=0.5):
                if self._stopping.is_set():
                    return
            loop.call_soon_threadsafe(self._queue.put_nowait, item)

        timeout = self.settings.detectors.kubernetes.watch_timeout
        for resource, fn in fns.items():
            w = ResourceWatch(
                resource,
                fn,
                timeout=timeout,
                emit=emit,
                stopping=self._stopping,
                page_size=self.settings.detectors.kubernetes.list_page_size,
            )
            self.watches[resource] = w
            self._tasks.append(loop.run_in_executor(self._pool, w.run))
        self._tasks.append(asyncio.create_task(self._process(), name="kube-watch-process"))

    @property
    def backlog(self) -> int:
        """Watch events queued, not yet handled."""
        return self._queue.qsize()

    @property
    def failure(self) -> BaseException | None:
        """Why a watch thread or the processing task died, if one did: the watcher would
        go on looking alive and publish nothing (see agent.runtime.run_until_signalled)."""
        return task_failure(*self._tasks)

    async def stop(self) -> None:
        self._stopping.set()
        for w in self.watches.values():
            w.stop()
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            if isinstance(t, asyncio.Task):
                t.cancel()
        if tasks:
            # A thread inside a request returns within its request timeout at the latest.
            bound = self.settings.detectors.kubernetes.watch_timeout + 20
            _, pending = await asyncio.wait(tasks, timeout=bound)
            if pending:
                log.warning("kube watch: %d watch threads did not stop in time", len(pending))
            for t in tasks:
                if t.done() and not t.cancelled() and t.exception() is not None:
                    log.warning("kube watch: a watch thread failed: %r", t.exception())
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self._owns_api and self._api is not None:
            self._api.close()
            self._api = None

    async def _process(self) -> None:
        """Hand watch events to the rules in the order they came, and every
        ``tick_interval`` by the clock check the restart windows and announce again what
        still fires (see agent.kube_signals.refresh).

        The tick used to run only after ``tick_interval`` without a watch event: in a
        cluster whose events never pause for that long, ``pod-restarting`` never resolved.
        Whatever has queued up while a batch was published goes out as the next batch: one
        publish (one Kafka round trip, batched records) per burst instead of one per event,
        which held a storm of pod transitions to a few hundred anomalies a second."""
        loop = asyncio.get_running_loop()
        next_tick = loop.time() + self.tick_interval
        while True:
            wait = next_tick - loop.time()
            if wait <= 0:
                now = self.clock()
                due = tick(self.state, now, self.rules)
                await self._publish(due + refresh(self.state, now, self.rules))
                next_tick = loop.time() + self.tick_interval
                continue
            try:
                items = [await asyncio.wait_for(self._queue.get(), timeout=wait)]
            except TimeoutError:
                continue
            while len(items) < DRAIN_AT_MOST and not self._queue.empty():
                items.append(self._queue.get_nowait())
            for _ in items:
                self._room.release()
            anomalies: list[Anomaly] = []
            for resource, kind, payload in items:
                now = self.clock()
                if kind == "SYNC":
                    anomalies += sync(self.state, resource, payload, now, self.rules)
                else:
                    anomalies += step(self.state, resource, kind, payload, now, self.rules)  # type: ignore[arg-type]
            await self._publish(anomalies)
            # A resource counts as synced once its list's anomalies are published.
            self._synced.update(resource for resource, kind, _ in items if kind == "SYNC")
            if self._synced >= set(RESOURCES):
                self.synced.set()

    async def _publish(self, anomalies: list[Anomaly]) -> None:
        """Retries until Kafka takes them: the watch state already moved past them."""
        if not anomalies:
            return
        group_by = self.settings.correlation.group_by
        delay = 0.5
        while True:
            try:
                # One Kafka or the correlator refuses is refused alone, by name: retried,
                # it held the watch (and every later event) forever.
                await publish_refusing(
                    self.publisher, self.topic, anomalies, group_by=group_by, metrics=self.metrics
                )
                break
            except AgentError as err:
                log.warning("kube watch: publishing failed (%s); retrying", err)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
