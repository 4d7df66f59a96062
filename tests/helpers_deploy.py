"""The Grafana dashboards' and the alert rules' queries under deploy/, read by the deploy tests
(test_deploy) and by the Prometheus test against a running pipeline (test_monitoring)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
# `<query> <op> <number>`: the query must return series on a healthy pipeline (test_monitoring).
ALERT_FORM = re.compile(r"^(?P<query>.+?)\s*(?P<op>[<>]=?|==|!=)\s*(?P<threshold>-?[0-9.]+)\s*$", re.S)


def dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))}


def dashboard_queries() -> list[str]:
    return [t["expr"] for d in dashboards().values() for p in d["panels"] for t in p["targets"]]


def alert_rules() -> list[dict]:
    data = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [r for g in data["groups"] for r in g["rules"]]


def alert_queries() -> list[str]:
    """Each rule's expression without its final comparison."""
    return [ALERT_FORM.match(r["expr"].strip()).group("query") for r in alert_rules()]
