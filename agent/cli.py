"""The ``sre-agent`` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import yaml

from agent.errors import AgentError, ConfigError
from agent.settings import Settings, config_warnings, load_settings
from agent.topics import CATALOG

log = logging.getLogger("sre_agent")


def promtool_problems(settings: Settings, promtool: str | None = None) -> list[str]:
    """Check every pattern's expression with Prometheus' own parser (promtool), if present."""
    tool = promtool or shutil.which("promtool")
    if tool is None:
        return []
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, p in enumerate(settings.patterns):
            rules = {"groups": [{"name": "check", "rules": [{"record": "x", "expr": p.condition}]}]}
            path = Path(tmp) / f"p{i}.yml"
            path.write_text(yaml.safe_dump(rules))
            proc = subprocess.run(
                [tool, "check", "rules", str(path)], capture_output=True, text=True, timeout=30
            )
            if proc.returncode != 0:
                detail = _promtool_error(proc.stdout + proc.stderr)
                problems.append(f"patterns[{i}].condition: invalid PromQL: {detail}")
    return problems


def _promtool_error(output: str) -> str:
    """Keep promtool's explanation: 'p0.yml: 5:11: group "check", rule 1, "x": could not
    parse expression: 1:10: parse error: bad duration syntax: "5"' -> from 'parse error'."""
    for line in output.splitlines():
        marker = "could not parse expression: "
        if marker in line:
            return line.split(marker, 1)[1].strip()
    for line in output.splitlines():
        if "error" in line.lower():
            return line.strip()
    return output.strip().splitlines()[-1] if output.strip() else "rejected by promtool"


def cmd_config_validate(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.file, env={} if args.no_env else None)
        problems = promtool_problems(settings)
        if problems:
            raise ConfigError(problems)
    except ConfigError as err:
        for p in err.problems:
            print(p, file=sys.stderr)
        return 1
    for warning in config_warnings(settings):
        print(f"warning: {warning}", file=sys.stderr)
    books = len(settings.runbooks) + len(settings.file_runbooks)
    print(f"{args.file}: ok ({len(settings.patterns)} patterns, {books} runbooks)")
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    if args.action == "list":
        for t in CATALOG:
            name = t.full_name(settings.kafka.topic_prefix)
            print(f"{name:32} key={t.key:30} {t.cleanup:8} {t.payload}")
        return 0
    from streams.bus import create_topics

    created = asyncio.run(create_topics(settings.kafka))
    for name in created:
        print(f"created {name}")
    print(f"{len(created)} created, {len(CATALOG) - len(created)} already present")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from agent.runtime import Agent, run_until_signalled
    from handlers.backend import TEST_CRASH_ENV, cluster_from, crash_after_apply

    settings = load_settings(args.config)
    # kubernetes.backend: "kubernetes" acts on the API server, "in-process" on a simulation.
    agent = Agent(settings, roles=args.role, cluster=cluster_from(settings))
    if os.environ.get(TEST_CRASH_ENV) == "1" and agent.executor is not None:  # test-only
        agent.executor.after_apply = crash_after_apply
    asyncio.run(run_until_signalled(agent))
    return 0


def cmd_lab(args: argparse.Namespace) -> int:
    from agent.lab import EXPERIMENTS, experiment, run_lab

    settings = load_settings(args.config)
    try:
        chosen = EXPERIMENTS if args.experiment == "all" else (experiment(args.experiment),)
    except ValueError as err:
        print(f"sre-agent lab: {err}", file=sys.stderr)
        return 64
    results: list[tuple[str, int]] = []
    for e in chosen:
        # Several in a row: each in a namespace of its own, so none waits for the series
        # of the one before to leave the rate windows (see agent.lab.await_quiet).
        ns = "shop" if len(chosen) == 1 else f"shop-{e.name}"
        code = asyncio.run(run_lab(settings, timeout=args.timeout, chaos=e, namespace=ns))
        results.append((e.name, code))
        if code == 2:
            break  # a component died: the next experiment would say nothing new
    if len(chosen) > 1:
        passed = sum(1 for _, code in results if code == 0)
        summary = ", ".join(f"{n} {'healed' if c == 0 else 'FAILED'}" for n, c in results)
        print(f"lab: {passed} of {len(chosen)} experiments healed ({summary})")
    return max(code for _, code in results)


def cmd_eval(args: argparse.Namespace) -> int:
    from agent.eval import DEFAULT_EVAL_FILE, format_report, load_eval, run_eval

    base = load_settings(args.config, env={})  # the environment must not change the score
    settings, cases = load_eval(args.file or DEFAULT_EVAL_FILE, base)
    report = run_eval(cases, settings)
    print(format_report(report))
    if args.min_accuracy is not None and report.accuracy < args.min_accuracy:
        print(f"accuracy {report.accuracy:.1%} < required {args.min_accuracy:.1%}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sre-agent", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    cfg = sub.add_parser("config", help="configuration commands")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    val = cfg_sub.add_parser("validate", help="validate a configuration file")
    val.add_argument("file")
    val.add_argument("--no-env", action="store_true", help="ignore SRE_AGENT__* overrides")
    val.set_defaults(func=cmd_config_validate)

    top = sub.add_parser("topics", help="the topic catalog")
    top.add_argument("action", choices=["create", "list"])
    top.add_argument("--config", default=None)
    top.set_defaults(func=cmd_topics)

    run = sub.add_parser("run", help="run agent roles until SIGTERM")
    run.add_argument(
        "--role",
        action="append",
        choices=["detector", "correlator", "analyzer", "executor", "all"],
        default=None,
    )
    run.add_argument("--config", default=None)
    run.set_defaults(func=cmd_run)

    lab = sub.add_parser("lab", help="the local lab: a faulty service healed end to end")
    lab.add_argument("--config", default="config/lab.yaml")
    lab.add_argument("--timeout", type=float, default=240.0)
    lab.add_argument(
        "--experiment",
        default="bad-rollout",
        help="the fault to inject and heal (bad-rollout, crash-loop, traffic-surge, "
        "node-failure), or all",
    )
    lab.set_defaults(func=cmd_lab)

    ev = sub.add_parser("eval", help="the rule-based analyzer's accuracy on the evaluation set")
    ev.add_argument("--file", default=None, help="default: tests/eval/incidents.yaml")
    ev.add_argument("--config", default=None, help="patterns and windows (default config)")
    ev.add_argument("--min-accuracy", type=float, default=None, help="exit 1 below this")
    ev.set_defaults(func=cmd_eval)

    from agent.remediation_cli import add_parsers

    add_parsers(sub)  # approvals list|approve|reject, actions list|undo
    from agent.incident_cli import add_parsers as add_incident_parsers

    add_incident_parsers(sub)  # incidents list|show
    from agent.silence_cli import register as register_silences

    register_silences(sub)
    from agent.switch_cli import add_parsers as add_switch_parsers

    add_switch_parsers(sub)  # switches status|kill|dry-run
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    for noisy in ("aiokafka", "faust", "mode", "kafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if getattr(args, "role", "x") is None:
        args.role = ["all"]
    try:
        code: int = args.func(args)
    except ConfigError as err:
        for p in err.problems:
            print(p, file=sys.stderr)
        return 1
    except AgentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
