"""Prometheus metrics of the agent. One registry per process, built by the composition root.

Names and types follow the reference (``sre_agent_remediation_total{service,action,result}``
a counter, ``sre_agent_incident_resolution_duration_seconds{service}`` a gauge its rules
``avg()``) so its recording rules and dashboard work unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.anomalies = Counter(
            "sre_agent_anomalies_total",
            "Anomalies published by detectors.",
            ["source", "name", "status"],
            registry=r,
        )
        self.detector_errors = Counter(
            "sre_agent_detector_errors_total",
            "Failed evaluations of a detector pattern.",
            ["pattern", "reason"],
            registry=r,
        )
        # The pattern loop's view of its Prometheus, which readiness no longer carries: the
        # Alertmanager webhook shares the detector's readiness and must take alerts (from
        # other Prometheus servers too) while this one is down.
        self.prometheus_up = Gauge(
            "sre_agent_detector_prometheus_up",
            "1 while the detector's Prometheus answers its pattern queries, 0 while its "
            "circuit is open (the agent's prometheus-unavailable anomaly fires meanwhile).",
            ["endpoint"],
            registry=r,
        )
        self.late_anomalies = Counter(
            "sre_agent_late_anomalies_total",
            "Anomalies older than correlation.late_bound, dead-lettered as late.",
            ["name"],
            registry=r,
        )
        self.correlation_decisions = Counter(
            "sre_agent_correlation_decisions_total",
            "Anomalies placed by the cross-partition view: absorbed (folded into a node or "
            "workload incident), inhibited, handed_over (moved from an earlier incident), "
            "rerouted (re-published to the partition of their group).",
            ["decision"],
            registry=r,
        )
        self.incidents = Counter(
            "sre_agent_incidents_total",
            "Incident transitions published by the correlator.",
            ["status"],
            registry=r,
        )
        # The reference averages the bare name, which a histogram never exposes (only
        # _bucket/_sum/_count): the bare name is a gauge, the distribution has its own name.
        self.last_resolution = Gauge(
            "sre_agent_incident_resolution_duration_seconds",
            "Time from opening to resolution of the last incident of the service this "
            "correlator resolved, on the partitions it owns.",
            ["service"],
            registry=r,
        )
        self._resolved_services: set[str] = set()
        self.resolution = Histogram(
            "sre_agent_incident_resolution_seconds",
            "Time from an incident opening to its resolution, for quantiles and means "
            "over a window.",
            ["service"],
            registry=r,
            buckets=(5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600),
        )
        self.escalations = Counter(
            "sre_agent_escalations_total",
            "Escalations published for a human, by reason.",
            ["reason"],
            registry=r,
        )
        self.notifications = Counter(
            "sre_agent_escalation_notifications_total",
            "Escalation deliveries to a webhook: delivered, retried (a transient failure), "
            "failed (refused, or given up on: dead-lettered).",
            ["webhook", "result"],
            registry=r,
        )
        self.analyses = Counter(
            "sre_agent_analyses_total",
            "Analyses produced, by analyzer and root-cause class.",
            ["analyzer", "root_cause_class"],
            registry=r,
        )
        self.remediation = Counter(
            "sre_agent_remediation_total",
            "Executed remediations; result is success or failure.",
            ["service", "action", "result"],
            registry=r,
        )
        self.remediation_decisions = Counter(
            "sre_agent_remediation_decisions_total",
            "Remediations not executed; result is pending_approval, denied, rejected, "
            "dry_run or duplicate.",
            ["service", "action", "result"],
            registry=r,
        )
        self.verification = Counter(
            "sre_agent_remediation_verified_total",
            "Verified outcomes of executed actions.",
            ["service", "action", "outcome"],
            registry=r,
        )
        self.verification_failed = Counter(
            "sre_agent_remediation_verification_failed_total",
            "Verifications of executed actions given up after their retries (Kafka, or a "
            "bug): the outcome (the next start verifies again) or its escalation is missing.",
            ["action"],
            registry=r,
        )
        self.budget_claims = Counter(
            "sre_agent_budget_claims_total",
            "Claims of the hourly budgets' units between executor replicas, by result: "
            "granted, denied, unavailable (not arbitrated: the action is retried).",
            ["result"],
            registry=r,
        )
        self.budget_claim_duration = Histogram(
            "sre_agent_budget_claim_seconds",
            "Time an executed action spent claiming its budget unit (write and read-back).",
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        )
        self.correlation_lag = Histogram(
            "sre_agent_correlation_lag_seconds",
            "Time from an anomaly record's Kafka timestamp (when it was published) to its "
            "incident changes being handed to Kafka, per record folded.",
            registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        self.correlator_backlog = Gauge(
            "sre_agent_correlator_backlog_records",
            "Records of an anomalies partition not yet folded, as of the worker's last "
            "batch from it.",
            ["partition"],
            registry=r,
        )
        self.recovery_stalls = Counter(
            "sre_agent_correlator_recovery_stalls_total",
            "Times the correlator found faust's recovery of its state stuck after a "
            "rebalance and made it read the changelog again.",
            registry=r,
        )
        self.correlator_stuck = Gauge(
            "sre_agent_correlator_stuck",
            "1 while the correlator has records waiting and has moved none for "
            "correlation.stuck_after (it then fails /health/live).",
            registry=r,
        )
        self.correlator_blind = Gauge(
            "sre_agent_correlator_blind",
            "1 while a source cannot see in a cluster (e.g. prometheus-unavailable fires) "
            "and the correlator resolves none of its anomalies there as quiet.",
            ["source", "cluster"],
            registry=r,
        )
        self.switch_on = Gauge(
            "sre_agent_switch_on",
            "1 while a run-time switch is on for this executor (kill_switch: no action "
            'executes; dry_run: none is applied): cluster-wide (namespace "") from the '
            "settings, the file or the switches topic, or for one namespace from the topic.",
            ["switch", "namespace"],
            registry=r,
        )
        self.consumer_stuck = Gauge(
            "sre_agent_consumer_stuck",
            "1 while a consumer (analyzer, executor, calibration, feeds) has made no "
            "progress for agent.stuck_after (it then fails /health/live).",
            ["consumer"],
            registry=r,
        )
        self.refused_members = Counter(
            "sre_agent_refused_members_total",
            "New members refused because their incident already holds correlation."
            "max_members firing members; dead-lettered.",
            ["name"],
            registry=r,
        )
        self.oversized_states = Counter(
            "sre_agent_oversized_states_total",
            "Incident states too large for a Kafka record even compressed: kept in the "
            "correlator's memory but not written to its changelog.",
            registry=r,
        )
        self.oversized_records = Counter(
            "sre_agent_oversized_records_total",
            "Events dead-lettered because a record they made is one Kafka refuses for its "
            "size (the producer's limit or the topic's); topic: that record's.",
            ["topic"],
            registry=r,
        )
        self.dead_letters = Counter(
            "sre_agent_dead_letters_total",
            "Messages sent to the dead-letter topic.",
            ["topic", "consumer"],
            registry=r,
        )
        self.webhook_requests = Counter(
            "sre_agent_webhook_requests_total",
            "Requests to the alert webhook receivers, by HTTP status code.",
            ["receiver", "code"],
            registry=r,
        )
        self.refused_anomalies = Counter(
            "sre_agent_refused_anomalies_total",
            "Anomalies a source (a pattern, the Kubernetes watch, a webhook) did not publish "
            "because the correlator or Kafka would refuse them (invalid, or a record too large "
            "for the producer or its topic); the others of their batch were published.",
            ["source", "name"],
            registry=r,
        )
        self.webhook_refused_alerts = Counter(
            "sre_agent_webhook_refused_alerts_total",
            "Alerts a webhook receiver refused (422) while publishing the others of their "
            "notification: invalid, or not making a valid anomaly.",
            ["receiver"],
            registry=r,
        )
        self.ignored_alerts = Counter(
            "sre_agent_ignored_alerts_total",
            "Alerts received (webhook, feed) and not made anomalies: the agent's own alerts "
            "(reason own: detectors.own_alerts_prefix) and the heartbeat (reason heartbeat).",
            ["source", "reason", "name"],
            registry=r,
        )
        self.processed = Counter(
            "sre_agent_events_processed_total",
            "Events processed per consumer.",
            ["consumer"],
            registry=r,
        )
        # --- the analysis stage and its LLM ---------------------------------------------
        self.analysis_duration = Histogram(
            "sre_agent_analysis_duration_seconds",
            "Time to analyse one incident revision (context, LLM or rules), by analyzer.",
            ["analyzer"],
            registry=r,
            buckets=(0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40),
        )
        self.llm_calls = Counter(
            "sre_agent_llm_calls_total",
            "Calls to the LLM by result: ok, timeout, rate_limited, server_error, "
            "unavailable, rejected, invalid_response.",
            ["result"],
            registry=r,
        )
        self.llm_tokens = Counter(
            "sre_agent_llm_tokens_total",
            "Tokens the LLM reported, by kind (prompt, completion).",
            ["kind"],
            registry=r,
        )
        self.analysis_fallbacks = Counter(
            "sre_agent_analysis_fallbacks_total",
            "Analyses the rule-based analyzer decided although the LLM is enabled, by reason.",
            ["reason"],
            registry=r,
        )
        self.llm_circuit_state = Gauge(
            "sre_agent_llm_circuit_state",
            "The LLM circuit breaker: 0 closed, 1 half-open, 2 open.",
            registry=r,
        )
        self.rejected_actions = Counter(
            "sre_agent_rejected_actions_total",
            "LLM-recommended actions rejected before reaching the executor, by reason.",
            ["reason"],
            registry=r,
        )
        self.confidence_outcomes = Counter(
            "sre_agent_confidence_outcomes_total",
            "Verified outcomes of executed actions by predicted confidence bucket, "
            "for calibration: healed / (healed + not_healed + worse) per bucket.",
            ["action", "confidence_bucket", "outcome"],
            registry=r,
        )

    def incident_resolved(self, service: str, seconds: float) -> None:
        """Count a resolution in the distribution (each once, by the worker that folded
        it: the sum over workers is right). The gauge is :meth:`export_resolutions`'."""
        self.resolution.labels(service=service).observe(seconds)

    def export_resolutions(self, latest: Mapping[str, float]) -> None:
        """Export the MTTR gauge for exactly these services (how long each one's latest
        resolution took). A service left out loses its series here: its partitions moved
        to another correlator, which exports it now; a stale copy kept here until a restart
        skewed the reference's ``avg()`` for as long."""
        for service in self._resolved_services - latest.keys():
            self.last_resolution.remove(service)
        for service, seconds in latest.items():
            self.last_resolution.labels(service=service).set(seconds)
        self._resolved_services = set(latest)
