"""Stream processing: the Kafka bus and the faust-streaming correlator."""
