"""The topic catalog: every topic the agent owns, its key, partitions and retention.

Names take the configured prefix (``kafka.topic_prefix``), so several agents or test runs
can share one cluster. Creation is idempotent (``sre-agent topics create``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DAY_MS = 86_400_000


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str  # without prefix
    key: str
    payload: str
    cleanup: Literal["delete", "compact"]
    retention_ms: int
    description: str
    partitions: int | None = None  # None: the configured default

    def full_name(self, prefix: str) -> str:
        return prefix + self.name

    def configs(self) -> dict[str, str]:
        cfg: dict[str, str] = {"cleanup.policy": self.cleanup}
        if self.cleanup == "delete":
            cfg["retention.ms"] = str(self.retention_ms)
        return cfg


CATALOG: tuple[TopicSpec, ...] = (
    TopicSpec(
        "anomalies",
        "cluster/namespace/service",
        "Anomaly",
        "delete",
        7 * DAY_MS,
        "What detectors observed; the correlator's input.",
    ),
    TopicSpec(
        "incidents",
        "incident key (group labels)",
        "Incident",
        "delete",
        30 * DAY_MS,
        "Every incident transition (open, updated, mitigating, resolved, reopened).",
    ),
    TopicSpec(
        "analyses",
        "incident key",
        "Analysis",
        "delete",
        30 * DAY_MS,
        "Root cause, confidence and recommended actions per incident revision.",
    ),
    TopicSpec(
        "actions",
        "target (Kind/namespace/name)",
        "ActionRequest",
        "delete",
        30 * DAY_MS,
        "Requested actions; keyed by target so one target's actions are serialized.",
    ),
    TopicSpec(
        "approvals",
        "approval request id",
        "ApprovalRequest",
        "compact",
        0,
        "Actions waiting for a human; compacted so pending approvals survive restarts.",
    ),
    TopicSpec(
        "decisions",
        "approval request id",
        "ApprovalDecision",
        "delete",
        30 * DAY_MS,
        "Approve/reject decisions from any Kafka client or `sre-agent approvals`.",
    ),
    TopicSpec(
        "action-results",
        "target (Kind/namespace/name)",
        "ActionResult",
        "delete",
        90 * DAY_MS,
        "What each action did, and its verified outcome.",
    ),
    TopicSpec(
        "silences",
        "silence id",
        "Silence",
        "compact",
        0,
        "Silences (matchers, start, end, author, comment); `sre-agent silence add|list|expire`.",
        partitions=1,
    ),
    TopicSpec(
        "switches",
        "switch name (kill_switch, dry_run), /namespace when scoped",
        "SwitchChange",
        "compact",
        0,
        "Run-time switches every executor replica reads before each decision; "
        "`sre-agent switches kill|dry-run on|off`.",
        partitions=1,
    ),
    TopicSpec(
        "budget-claims",
        "action id",
        "BudgetClaim",
        "delete",
        DAY_MS,
        "Executor replicas claiming units of the hourly action budgets before acting; one "
        "partition, so its order arbitrates between replicas.",
        partitions=1,
    ),
    TopicSpec(
        "correlation-facts",
        "anomaly fingerprint",
        "Fact",
        "compact",
        0,
        "Node-, workload-level and inhibition-source anomalies every correlator worker "
        "reads in full: the cross-partition view for topology and inhibition.",
        partitions=1,
    ),
    TopicSpec(
        "heartbeats",
        "cluster/alertname",
        "Heartbeat",
        "compact",
        0,
        "When a detector replica last received Alertmanager's heartbeat: every replica "
        "behind the webhooks' Service judges it missing from the latest any received.",
        partitions=1,
    ),
    TopicSpec(
        "escalations",
        "incident key",
        "Escalation",
        "delete",
        30 * DAY_MS,
        "What a human must look at: failed, unhealed or undecided actions and notify_oncall "
        "steps; delivered to escalation.webhooks.",
    ),
    TopicSpec(
        "dead-letter",
        "source topic",
        "DeadLetter",
        "delete",
        30 * DAY_MS,
        "Messages that failed to decode or process, with the raw bytes and the error.",
    ),
)

BY_NAME = {t.name: t for t in CATALOG}


def topic(prefix: str, name: str) -> str:
    if name not in BY_NAME:
        raise KeyError(f"unknown topic {name!r}")
    return BY_NAME[name].full_name(prefix)
