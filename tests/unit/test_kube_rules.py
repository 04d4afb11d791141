"""The Kubernetes adapter's pure parts: label selectors, IntOrString arithmetic, rollout
disruption, kubectl-undo templates, when a revision became current, error translation; and
the verification judgement."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import ActionFailed, TransientError
from handlers.cluster import Observation, rolled_back_from
from handlers.kube import (
    Conflict,
    RevisionDates,
    eviction_block,
    last_set,
    log_query,
    replica_set_history,
    restarted_at,
    revision_times,
    rollout_disruption,
    scaled_value,
    selector_matches,
    template_without_hash,
    translate,
)
from handlers.verification import judge, restarts_since

LABELS = {"app": "web", "tier": "front"}


@pytest.mark.parametrize(
    ("selector", "matches"),
    [
        (None, False),  # a null selector selects nothing
        ({}, True),  # an empty one everything (policy/v1 PDB semantics)
        ({"matchLabels": {"app": "web"}}, True),
        ({"matchLabels": {"app": "api"}}, False),
        ({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["front"]}]}, True),
        ({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["front"]}]}, False),
        ({"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["a"]}]}, True),
        ({"matchExpressions": [{"key": "zone", "operator": "Exists"}]}, False),
        ({"matchExpressions": [{"key": "zone", "operator": "DoesNotExist"}]}, True),
        ({"matchExpressions": [{"key": "app", "operator": "Gt", "values": ["1"]}]}, False),
    ],
)
def test_selector_matches(selector: Any, matches: bool) -> None:
    assert selector_matches(selector, LABELS) is matches


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from("abc"), st.sampled_from("xy"), max_size=3))
def test_match_labels_is_a_subset_test(wanted: dict[str, str]) -> None:
    labels = {"a": "x", "b": "y"}
    expected = all(labels.get(k) == v for k, v in wanted.items())
    assert selector_matches({"matchLabels": wanted}, labels) is expected


def test_scaled_value_rounds_like_the_controllers() -> None:
    assert scaled_value("25%", 3, round_up=False, default="0") == 0
    assert scaled_value("25%", 3, round_up=True, default="0") == 1
    assert scaled_value(None, 8, round_up=False, default="25%") == 2
    assert scaled_value(2, 8, round_up=False, default="25%") == 2
    assert scaled_value("3", 8, round_up=False, default="25%") == 3


def deployment(replicas: int, ready: int, **strategy: Any) -> dict[str, Any]:
    return {
        "kind": "Deployment",
        "spec": {"replicas": replicas, "strategy": strategy},
        "status": {"readyReplicas": ready},
    }


def test_rollout_disruption() -> None:
    assert rollout_disruption(deployment(3, 3)) == 0  # 25% of 3 rounds down; surge 1
    assert rollout_disruption(deployment(8, 8)) == 2
    assert rollout_disruption(deployment(4, 4, type="Recreate")) == 4
    assert rollout_disruption(deployment(4, 1, type="Recreate")) == 1  # only ready pods count
    both_zero = {"maxSurge": 0, "maxUnavailable": 0}
    assert rollout_disruption(deployment(4, 4, rollingUpdate=both_zero)) == 1
    sts: dict[str, Any] = {
        "kind": "StatefulSet",
        "spec": {"replicas": 3},
        "status": {"readyReplicas": 3},
    }
    assert rollout_disruption(sts) == 1
    sts["spec"]["updateStrategy"] = {"type": "OnDelete"}
    assert rollout_disruption(sts) == 0


def test_template_without_hash_drops_only_the_hash_label() -> None:
    template = {"metadata": {"labels": {"app": "web", "pod-template-hash": "abc"}}, "spec": {}}
    out = template_without_hash(template)
    assert out == {"metadata": {"labels": {"app": "web"}}, "spec": {}}
    assert template["metadata"]["labels"]["pod-template-hash"] == "abc"  # not mutated


def test_eviction_block_prefers_the_budget_causes() -> None:
    doc = {
        "message": "Cannot evict pod as it would violate the pod's disruption budget.",
        "details": {
            "causes": [
                {
                    "reason": "DisruptionBudget",
                    "message": "The disruption budget web needs 3 healthy pods and has 3 currently",
                }
            ]
        },
    }
    assert (
        eviction_block(doc) == "The disruption budget web needs 3 healthy pods and has 3 currently"
    )
    assert "violate" in eviction_block({"message": doc["message"]})


def test_translate_maps_statuses_to_agent_errors() -> None:
    forbidden = {
        "message": 'deployments.apps "web" is forbidden: User "system:serviceaccount:x:sre-agent" '
        'cannot delete resource "deployments" in API group "apps" in the namespace "x"'
    }
    err = translate(403, forbidden, {}, method="DELETE", what="Deployment/x/web")
    assert isinstance(err, ActionFailed)
    assert 'cannot delete resource "deployments"' in str(err) and str(err).startswith("forbidden")
    assert str(translate(404, {}, {}, method="GET", what="Pod/x/p")) == "Pod/x/p not found"
    assert isinstance(translate(409, {}, {}, method="PATCH", what="w"), Conflict)
    busy = translate(429, {}, {"Retry-After": "3"}, method="GET", what="w")
    assert isinstance(busy, TransientError) and busy.retry_after == 3.0
    assert isinstance(translate(503, {}, {}, method="GET", what="w"), TransientError)
    invalid = translate(422, {"message": "spec.replicas: Invalid"}, {}, method="PATCH", what="w")
    assert isinstance(invalid, ActionFailed) and "spec.replicas" in str(invalid)


# --- verification -------------------------------------------------------------------------------

READY = Observation(desired=3, ready=3)


def test_judge_prefers_the_triggering_condition() -> None:
    assert judge("rollback", READY, READY, ("not_healed", "x still firing")) == (
        "not_healed",
        "x still firing",
    )
    assert judge("rollback", READY, READY, ("healed", "x cleared"))[0] == "healed"


def test_judge_calls_fewer_ready_pods_worse_whatever_the_trigger() -> None:
    after = Observation(desired=3, ready=1, settled=False)
    outcome, why = judge("restart_workload", READY, after, ("healed", "x cleared"))
    assert outcome == "worse" and "fell from 3 to 1 of 3" in why


def test_judge_uses_the_target_state_without_a_trigger() -> None:
    assert judge("scale_up", None, Observation(desired=4, ready=4), None)[0] == "healed"
    rolling = Observation(desired=4, ready=4, settled=False)
    assert judge("scale_up", None, rolling, None) == (
        "not_healed",
        "no condition to re-check; 4/4 replicas ready, rollout not finished",
    )
    assert judge("drain_node", None, Observation(cordoned=True, evictable=2), None)[0] == (
        "not_healed"
    )
    assert judge("drain_node", None, Observation(cordoned=True), None)[0] == "healed"
    assert judge("cordon_node", None, Observation(cordoned=False), None)[0] == "not_healed"
    assert judge("restart_pod", None, Observation(exists=False), None)[0] == "healed"
    assert judge("update_config", None, Observation(), None)[0] == "unknown"
    assert judge("rollback", None, None, ("unknown", "pattern gone"))[0] == "unknown"


def test_a_restarted_pod_replaced_under_its_name_is_healed_by_its_uid() -> None:
    unknown = ("unknown", "KubePodCrashLooping not re-checked")
    replacement = Observation(desired=1, ready=1, uid="uid-2")  # a StatefulSet's db-0
    assert judge("restart_pod", None, replacement, unknown, "uid-1") == (
        "healed",
        "KubePodCrashLooping not re-checked; the pod was replaced (a new pod under its name)",
    )
    assert judge("restart_pod", None, replacement, unknown, "uid-2")[0] == "not_healed"


def test_containers_restarting_since_the_action_are_not_healed_whatever_else_says() -> None:
    crashing = Observation(desired=3, ready=3, restarts=2)
    # Every replica ready at this instant, the alert cleared: the restarts still tell.
    assert judge("restart_workload", READY, crashing, ("healed", "x cleared")) == (
        "not_healed",
        "containers restarted 2 times since the action; x cleared",
    )
    assert judge("rollback", None, crashing, None) == (
        "not_healed",
        "containers restarted 2 times since the action",
    )
    # A scale keeps the old pods: only restarts beyond the count before it are news.
    before = Observation(desired=3, ready=3, restarts=5)
    assert judge("scale_up", before, Observation(desired=4, ready=4, restarts=5), None)[0] == (
        "healed"
    )
    assert judge("scale_up", before, Observation(desired=4, ready=4, restarts=6), None)[1] == (
        "containers restarted 1 times since the action"
    )
    assert judge("scale_up", None, crashing, None)[0] == "healed"  # no count before: unknown
    # Mid-rollout the old pods' restarts are still counted: not blamed on the action.
    rolling = Observation(desired=3, ready=3, restarts=4, settled=False)
    assert judge("restart_workload", READY, rolling, None)[1].endswith("rollout not finished")
    # A cleared condition mid-rollout is not "healed": the new pods are not all up, and
    # whether they crash cannot be read yet.
    assert judge("rollback", READY, rolling, ("healed", "x cleared")) == (
        "unknown",
        "x cleared, but the rollout has not finished: its new pods are not judged",
    )
    scaling = Observation(desired=4, ready=3, settled=False)
    assert judge("scale_up", READY, scaling, ("healed", "x cleared"))[0] == "healed"
    # Fewer ready pods than before is still "worse".
    assert judge("restart_workload", READY, replace(crashing, ready=1), None)[0] == "worse"


@settings(max_examples=200)
@given(
    st.sampled_from(["rollback", "restart_workload", "scale_up", "scale_down", "drain_node"]),
    st.none() | st.integers(0, 50),
    st.integers(0, 50),
    st.booleans(),
)
def test_restarts_since_is_positive_or_none(
    action: str, before: int | None, after: int, settled_: bool
) -> None:
    seen_before = None if before is None else Observation(restarts=before)
    n = restarts_since(action, seen_before, Observation(restarts=after, settled=settled_))
    assert n is None or 0 < n <= after
    if n is not None and action in ("scale_up", "scale_down"):
        assert before is not None and n == after - before


def test_a_restart_is_read_from_the_pod_template() -> None:
    def template(stamp: str) -> dict[str, Any]:
        return {"metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": stamp}}}

    # kubectl writes RFC 3339 with a Z; the executor, isoformat with an offset.
    assert restarted_at(template("2026-11-28T10:00:00Z")) == datetime(2026, 11, 28, 10, tzinfo=UTC)
    assert restarted_at(template("2026-11-28T10:00:00+00:00")) == datetime(
        2026, 11, 28, 10, tzinfo=UTC
    )
    assert restarted_at(template("yesterday")) is None
    assert restarted_at({}) is None


def test_a_log_window_is_asked_for_as_whole_seconds_before_now() -> None:
    now = datetime(2026, 11, 28, 10, tzinfo=UTC)
    assert log_query(50, None, now) == [("tailLines", "50")]
    since = datetime(2026, 11, 28, 9, 44, 59, 500000, tzinfo=UTC)
    assert log_query(50, since, now) == [("tailLines", "50"), ("sinceSeconds", "901")]
    # A window starting after now still asks for something the API accepts (>= 1).
    assert log_query(50, now.replace(hour=11), now)[1] == ("sinceSeconds", "1")


# --- when a revision became current ------------------------------------------------------------

REVISION_FIELD = {"f:metadata": {"f:annotations": {"f:deployment.kubernetes.io/revision": {}}}}


def minute(m: int) -> datetime:
    return datetime(2026, 12, 7, 10, tzinfo=UTC) + timedelta(minutes=m)


def stamp(m: int) -> str:
    return minute(m).isoformat().replace("+00:00", "Z")


def replica_set(
    revision: int, image: str, created: int, changed: int | None, history: str = ""
) -> dict[str, Any]:
    """A ReplicaSet as the API server returns it: the controller-manager's Update entry owns
    its revision annotation and replicas (``changed``: its time, None when managed fields
    are not kept); ``history``: the numbers it had before it was renumbered."""
    annotations = {"deployment.kubernetes.io/revision": str(revision)}
    if history:
        annotations["deployment.kubernetes.io/revision-history"] = history
    managed = [
        {
            "manager": "kube-controller-manager",
            "operation": "Update",
            "subresource": "status",
            "time": stamp(59),  # status moves all the time
            "fieldsV1": {"f:status": {"f:replicas": {}}},
        },
    ]
    if changed is not None:
        fields = {**REVISION_FIELD, "f:spec": {"f:replicas": {}}}
        managed.append(
            {
                "manager": "kube-controller-manager",
                "operation": "Update",
                "time": stamp(changed),
                "fieldsV1": fields,
            }
        )
    return {
        "metadata": {
            "creationTimestamp": stamp(created),
            "annotations": annotations,
            "managedFields": managed,
        },
        "spec": {"template": {"spec": {"containers": [{"name": "app", "image": image}]}}},
    }


def dates(sets: list[dict[str, Any]]) -> list[tuple[int, str, datetime]]:
    return [(r.number, r.image, r.at) for r in replica_set_history(sets)]


def test_the_manager_that_set_a_field_dates_it() -> None:
    rs = replica_set(3, "v1", created=0, changed=20)
    revision = ("f:metadata", "f:annotations", "f:deployment.kubernetes.io/revision")
    assert last_set(rs, revision) == minute(20)
    assert last_set(rs, ("f:metadata", "f:annotations")) == minute(20)
    assert last_set(rs, ("f:status", "f:replicas")) == minute(59)
    assert last_set(rs, ("f:spec", "f:paused")) is None
    assert last_set({"metadata": {}}, ("f:revision",)) is None


def test_a_template_rolled_back_to_is_dated_when_it_became_current_again() -> None:
    """v1 (revision 1, minute 0), v2 (minute 10), back to v1 at minute 20: the controller
    renumbers v1's ReplicaSet 3 and keeps its creation. It became current when v2's was
    scaled down for it (minute 21), not at its creation, nor at its own later scale (40)."""
    v1 = replica_set(3, "v1", created=0, changed=40, history="1")
    v2 = replica_set(2, "v2", created=10, changed=21)
    assert dates([v1, v2]) == [(2, "v2", minute(10)), (3, "v1", minute(21))]
    # The ReplicaSet it replaced pruned: its own last change is all there is.
    assert dates([v1]) == [(3, "v1", minute(40))]


def test_a_replica_set_never_renumbered_is_dated_by_its_creation() -> None:
    """A scale moves the controller's time on every ReplicaSet it touches: without a
    revision history it says nothing of when the revision became current."""
    v1 = replica_set(1, "v1", created=0, changed=11)  # scaled down by v2's rollout
    v2 = replica_set(2, "v2", created=10, changed=50)  # scaled by an HPA since
    assert dates([v2, v1]) == [(1, "v1", minute(0)), (2, "v2", minute(10))]
    # Managed fields not kept: the creation, as before.
    assert dates([replica_set(3, "v1", created=0, changed=None, history="1")]) == [
        (3, "v1", minute(0))
    ]


def test_no_revision_is_dated_after_a_later_one() -> None:
    """v1 re-activated as 3 at minute 20, scaled down late by v3's rollout (created at
    minute 30, done at 50): 3 became current before 4, so no later than minute 30."""
    v1 = replica_set(3, "v1", created=0, changed=50, history="1")
    v3 = replica_set(4, "v3", created=30, changed=31)
    assert dates([v1, v3]) == [(3, "v1", minute(30)), (4, "v3", minute(30))]


def test_a_template_rolled_back_to_is_marked_restored_with_what_it_replaced() -> None:
    """v1 (minute 0), v2 (10), back to v1 (renumbered 3, at 20), then v3 (30): only 3 is
    re-activated (created before the revision it replaced), and rolling it back would
    re-deploy v2, which it moved the Deployment away from. By creation times: it holds
    without managedFields too."""
    v1 = replica_set(3, "v1", created=0, changed=21, history="1")
    v2 = replica_set(2, "v2", created=10, changed=21)
    history = replica_set_history([v1, v2])
    assert [(r.number, r.restored) for r in history] == [(2, False), (3, True)]
    assert rolled_back_from(history) == (("v2", minute(21)),)
    v3 = replica_set(4, "v3", created=30, changed=31)
    history = replica_set_history([v1, v2, v3])
    assert [(r.number, r.restored) for r in history] == [(2, False), (3, True), (4, False)]
    bare = replica_set_history([replica_set(3, "v1", 0, None, "1"), replica_set(2, "v2", 10, None)])
    assert [(r.number, r.restored) for r in bare] == [(2, False), (3, True)]
    # v2 created in v1's second: the revision history still says v1 was renumbered.
    alike = replica_set_history([replica_set(3, "v1", 0, 1, "1"), replica_set(2, "v2", 0, 1)])
    assert [(r.number, r.restored) for r in alike] == [(2, False), (3, True)]
    # A plain rollout history: nothing restored, nothing a rollback moved away from.
    plain = replica_set_history([replica_set(1, "v1", 0, 11), replica_set(2, "v2", 10, 50)])
    assert not any(r.restored for r in plain) and rolled_back_from(plain) == ()


@settings(max_examples=200)
@given(
    st.dictionaries(
        st.integers(1, 6),
        st.tuples(
            st.integers(0, 60), st.none() | st.integers(0, 60), st.none() | st.integers(0, 60)
        ),
        max_size=6,
    )
)
def test_revision_times_follow_the_numbers(
    raw: dict[int, tuple[int, int | None, int | None]],
) -> None:
    history = {
        n: RevisionDates(
            created=minute(c),
            numbered=None if s is None else minute(s),
            changed=None if x is None else minute(x),
        )
        for n, (c, s, x) in raw.items()
    }
    times = revision_times(history)
    assert sorted(times) == sorted(history)
    ordered = [times[n] for n in sorted(times)]
    assert ordered == sorted(ordered)
    for n, t in times.items():
        # Never later than its own record says: its creation, or when its number was set.
        assert t <= max(history[n].created, history[n].numbered or history[n].created)
