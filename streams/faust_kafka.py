"""faust's aiokafka transport with a bounded consumer long-poll.

faust builds its worker consumer with ``fetch_max_wait_ms=1500`` hard-coded (no setting
reaches it). aiokafka keeps one fetch in flight per broker: while a fetch for partitions
without new data (the table's changelog, a quiet anomaly partition) is parked on the broker
for up to 1.5 s, a partition whose records were just consumed cannot be fetched again, so
fresh anomalies wait up to 1.5 s before the correlator sees them. The correlator measured
gaps of 1.4 s between batches with the default.

:class:`App` is a :class:`faust.App` whose transport builds the worker consumer with
``kafka.fetch_max_wait_ms`` instead. Everything else is faust's own code.
"""

from __future__ import annotations

from typing import Any, cast

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka


class App(faust.App):
    #: Upper bound of the worker consumer's long-poll; set before the app starts.
    fetch_max_wait_ms: int = 10

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
