"""The Prometheus boundary (prometheus-api-client). Only this module imports it.

The client is synchronous (requests), so queries run in a small dedicated thread pool with
a timeout; the event loop never blocks on Prometheus. Errors are translated once: a bad
expression is a :class:`PermanentError`, anything else (connection refused, timeout, 5xx)
is :class:`DependencyUnavailable`. So is a malformed reply; but a reply that is not an
instant vector (the expression evaluates to a scalar, a string or, for a range selector,
a matrix) is the expression's fault: :class:`InvalidQuery`, naming the result type.
"""

from __future__ import annotations

import asyncio
import math
import re
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime

import requests
from prometheus_api_client import PrometheusConnect
from prometheus_api_client.exceptions import PrometheusApiClientException
from requests.exceptions import RequestException
from urllib3.util.retry import Retry

from agent.errors import DependencyUnavailable, PermanentError, plain


@dataclass(frozen=True, slots=True)
class Sample:
    labels: Mapping[str, str]
    value: float


@dataclass(frozen=True, slots=True)
class Vector:
    """An instant-vector reply. ``warnings`` non-empty: the reply may be partial (Thanos,
    Mimir or Cortex answer "success" with a store or ingester missing), so a series absent
    from it may still be there."""

    samples: list[Sample]
    warnings: tuple[str, ...] = ()

    @property
    def partial(self) -> bool:
        """Whether a warning says data may be missing. Prometheus' own annotations of the
        expression ("PromQL warning: ...", "PromQL info: ..." since 2.46, e.g. a quantile
        out of range) say nothing of the kind, and one that is there at every evaluation
        would keep the pattern blind for good."""
        return any(not w.startswith(_ANNOTATION) for w in self.warnings)


_ANNOTATION = ("PromQL warning:", "PromQL info:")


# custom_query returns only data.result; the result type and the warnings beside it are
# read off the response by a hook of the client's session, which runs in the thread making
# the call.
_reply = threading.local()
# (A quote inside a label value is escaped, so a label cannot fake it.)
_RESULT_TYPE = re.compile(rb'"resultType"\s*:\s*"([A-Za-z]{1,20})"')


def _note_reply(response: requests.Response, *args: object, **kwargs: object) -> None:
    warnings: tuple[str, ...] = ()
    result_type = None
    if response.status_code == 200 and (m := _RESULT_TYPE.search(response.content)):
        result_type = m.group(1).decode()
    if response.status_code == 200 and b'"warnings"' in response.content:
        try:
            found = response.json().get("warnings")
        except (ValueError, AttributeError):
            found = None  # custom_query reports a body it cannot read
        if found:
            found = found if isinstance(found, list) else [found]
            warnings = tuple(plain(str(w), 500) for w in found[:10])
    _reply.warnings = warnings
    _reply.result_type = result_type


class InvalidQuery(PermanentError):
    """Prometheus rejected the expression itself (HTTP 400)."""


class PromClient:
    def __init__(self, url: str, *, timeout: float = 5.0, workers: int = 4) -> None:
        self.url = url
        self.timeout = timeout
        # No client-side retries: the detector's interval is the retry, and a slow failure
        # would hide an outage behind the timeout.
        self._session = requests.Session()
        self._session.hooks["response"].append(_note_reply)
        self._client = PrometheusConnect(
            url=url, disable_ssl=True, retry=Retry(total=0), timeout=timeout, session=self._session
        )
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prom")
        self._closed = False

    async def query(self, expr: str, *, at: datetime | None = None) -> list[Sample]:
        """Evaluate ``expr`` now, or at the instant ``at`` (what HA replicas agree on)."""
        return (await self.query_vector(expr, at=at)).samples

    async def query_vector(self, expr: str, *, at: datetime | None = None) -> Vector:
        """:meth:`query`, with the warnings of the reply (see :class:`Vector`)."""
        loop = asyncio.get_running_loop()
        # Prometheus aborts the query itself after the timeout, so a slow query does not
        # keep burning its CPU after we gave up on it.
        params = {"timeout": f"{self.timeout:g}s"}
        if at is not None:
            params["time"] = f"{at.timestamp():.3f}"

        def call() -> tuple[object, tuple[str, ...], str | None]:
            _reply.warnings, _reply.result_type = (), None
            raw = self._client.custom_query(expr, params=params)
            return raw, _reply.warnings, _reply.result_type

        try:
            raw, warnings, result_type = await asyncio.wait_for(
                loop.run_in_executor(self._pool, call), timeout=self.timeout + 1
            )
        except PrometheusApiClientException as err:
            if "400" in str(err) or "bad_data" in str(err):
                raise InvalidQuery(f"prometheus rejected {expr!r}: {plain(str(err))}") from err
            # (The client's text carries the reply's body.)
            raise DependencyUnavailable(f"prometheus {self.url}: {plain(str(err))}") from err
        except (RequestException, TimeoutError, OSError) as err:
            raise DependencyUnavailable(f"prometheus {self.url}: {err!r}") from err
        if result_type not in (None, "vector"):
            raise InvalidQuery(_not_a_vector(expr, result_type))
        try:
            return Vector(parse_vector(raw), warnings)
        except InvalidQuery as err:
            raise InvalidQuery(_not_a_vector(expr, "scalar or string")) from err

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._session.close()


def _not_a_vector(expr: str, result_type: str) -> str:
    return (
        f"{expr!r} evaluates to a {result_type}, not an instant vector: it selects no "
        "series (a pattern's condition must, e.g. `sum by (service) (x) > 0`)"
    )


def parse_vector(raw: object) -> list[Sample]:
    """Validate an instant-vector reply; a malformed reply names what is wrong. A scalar
    or string result (``[<time>, "<value>"]``), also when the reply did not say its type,
    is :class:`InvalidQuery`: it is no series, and the expression's fault."""
    if (
        isinstance(raw, list)
        and len(raw) == 2
        and isinstance(raw[0], int | float)
        and isinstance(raw[1], str)
    ):
        raise InvalidQuery(f"prometheus reply: a scalar or string result {raw!r:.100}")
    if not isinstance(raw, list):
        raise DependencyUnavailable(
            f"prometheus reply: expected a vector, got {type(raw).__name__}"
        )
    out = []
    for i, item in enumerate(raw):
        try:
            labels = {str(k): str(v) for k, v in item["metric"].items()}
            value = float(item["value"][1])
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
            raise DependencyUnavailable(
                f"prometheus reply: result[{i}] malformed ({err!r})"
            ) from err
        if not math.isnan(value):
            out.append(Sample(labels=labels, value=value))
    return out
