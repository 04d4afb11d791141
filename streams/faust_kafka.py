"""faust's aiokafka transport with a bounded consumer long-poll.

faust builds its worker consumer with ``fetch_max_wait_ms=1500`` hard-coded (no setting
reaches it). aiokafka keeps one fetch in flight per broker: while a fetch for partitions
without new data (the table's changelog, a quiet anomaly partition) is parked on the broker
for up to 1.5 s, a partition whose records were just consumed cannot be fetched again, so
fresh anomalies wait up to 1.5 s before the correlator sees them. The correlator measured
gaps of 1.4 s between batches with the default.

:class:`App` is a :class:`faust.App` whose transport builds the worker consumer with
``kafka.fetch_max_wait_ms`` instead.

faust's table manager also sleeps a hard-coded second when it starts, for tables an
application defines after starting; until it is done the app does not subscribe. The
correlator defines its one table before it starts, so :class:`App` uses a
:class:`_TableManager` that does not sleep: every correlator start was a second longer for
nothing. Everything else is faust's own code.
"""

from __future__ import annotations

from typing import Any, cast

import faust
from faust.tables.manager import TableManager
from faust.transport.drivers import aiokafka as faust_aiokafka


class _TableManager(TableManager):
    async def on_start(self) -> None:
        # faust's own, less its leading sleep(1.0) (tables are added before the app starts:
        # one added later is refused, "Too late to add tables", as it is after the sleep).
        if not self.should_stop:
            await self._update_channels()
            await self.recovery.start()


class App(faust.App):
    #: Upper bound of the worker consumer's long-poll; set before the app starts.
    fetch_max_wait_ms: int = 10

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, TableManager=_TableManager, **kwargs)

    def _new_transport(self) -> Any:
        return _Transport(self.conf.broker_consumer, self)


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # aiokafka passes this to its Fetcher when the consumer starts, which is after this.
        if not hasattr(consumer, "_fetch_max_wait_ms"):
            raise RuntimeError("aiokafka changed: AIOKafkaConsumer._fetch_max_wait_ms is gone")
        consumer._fetch_max_wait_ms = cast(App, self.app).fetch_max_wait_ms
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> _ConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(faust_aiokafka.Transport):
    Consumer = _Consumer
