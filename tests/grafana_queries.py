"""Our dashboards and alert rules as Grafana sees them: their queries, and
template variables and macros replaced the way Grafana replaces them.

Grafana itself does not run here, so the tests hand these rendered queries
to the real query engines (influxd and Prometheus) instead.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
DASHBOARDS_DIR = REPO / "grafana" / "dashboards"
PROVISIONING_DIR = REPO / "grafana" / "provisioning"
ALERTING_DIR = PROVISIONING_DIR / "alerting"
EXPRESSION_UID = "__expr__"
# What Grafana would use for our dashboards' default range (now-6h) on a
# panel about a thousand pixels wide.
DASHBOARD_RANGE_SECONDS = 6 * 3600
DASHBOARD_INTERVAL_MS = 20_000

# $name, ${name}, ${name:format} and [[name]], as Grafana's template service
# recognises them.
_VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]")
# The characters Grafana escapes in each value of a multi-value regex.
_REGEX_SPECIAL = re.compile(r"[\\^$*+?.()|{}\[\]/]")


@dataclass(frozen=True)
class Query:
    """One query text, where it lives, and the data source it runs on."""

    origin: str
    datasource: str
    text: str
    range_seconds: int = DASHBOARD_RANGE_SECONDS
    interval_ms: int = DASHBOARD_INTERVAL_MS

    def __str__(self) -> str:
        return self.origin


def load_yaml(path: Path) -> Any:
    """The parsed YAML document in ``path``."""
    return yaml.safe_load(path.read_text())


def load_dashboards() -> dict[str, dict[str, Any]]:
    """Every dashboard JSON file, by file name."""
    return {
        path.name: json.loads(path.read_text())
        for path in sorted(DASHBOARDS_DIR.glob("*.json"))
    }


def iter_panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, with those nested in collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def query_panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel that shows data, i.e. all but rows."""
    return (p for p in iter_panels(dashboard) if p.get("type") != "row")


def target_text(target: Mapping[str, Any]) -> str:
    """The query a panel target runs: PromQL ``expr`` or raw InfluxQL."""
    return str(target.get("expr") or target.get("query") or "")


def panel_queries(dashboard: Mapping[str, Any]) -> Iterator[Query]:
    """Every panel target's query, named by dashboard, panel id and refId."""
    for panel in query_panels(dashboard):
        for target in panel.get("targets", []):
            source = target.get("datasource") or panel["datasource"]
            yield Query(
                f"{dashboard['uid']}/panel-{panel['id']}/{target['refId']}",
                source["uid"],
                target_text(target),
            )


def variable_query_text(variable: Mapping[str, Any]) -> str:
    """A query variable's query, stored either as a string or an object."""
    query = variable.get("query", "")
    return str(query.get("query", "")) if isinstance(query, dict) else str(query)


def load_alert_groups() -> list[dict[str, Any]]:
    """Every rule group from every alerting provisioning file."""
    groups: list[dict[str, Any]] = []
    for path in sorted(ALERTING_DIR.glob("*.y*ml")):
        groups.extend(load_yaml(path).get("groups", []))
    return groups


def load_alert_rules() -> list[dict[str, Any]]:
    """Every provisioned alert rule."""
    return [rule for group in load_alert_groups() for rule in group["rules"]]


def alert_queries() -> Iterator[Query]:
    """Every data source query of every alert rule (expressions excluded)."""
    for rule in load_alert_rules():
        for item in rule["data"]:
            if item["datasourceUid"] != EXPRESSION_UID:
                yield Query(
                    f"alert/{rule['uid']}/{item['refId']}",
                    item["datasourceUid"],
                    target_text(item["model"]),
                    item["relativeTimeRange"]["from"],
                    item["model"].get("intervalMs", 1000),
                )


def all_queries(datasource: str) -> list[Query]:
    """Every dashboard and alert rule query that runs on ``datasource``."""
    found = [q for board in load_dashboards().values() for q in panel_queries(board)]
    found.extend(alert_queries())
    return [q for q in found if q.datasource == datasource]


def regex_value(values: Sequence[str]) -> str:
    """A multi-value variable as Grafana writes it into a regex: ``(a|b)``."""
    escaped = [_REGEX_SPECIAL.sub(lambda m: "\\" + m.group(0), v) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def substitute(text: str, values: Mapping[str, str]) -> str:
    """``text`` with every variable replaced; KeyError names an unknown one."""

    def replace(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        if name not in values:
            raise KeyError(f"undefined variable ${name} in {text!r}")
        return values[name]

    return _VARIABLE.sub(replace, text)


def influx_relative_time_filter(duration: str) -> str:
    """``$timeFilter`` for a range ending now, as Grafana's browser code writes it."""
    return f"time >= now() - {duration}"


def influx_absolute_time_filter(start_ms: int, end_ms: int) -> str:
    """``$timeFilter`` as Grafana's server side writes it: epoch milliseconds."""
    return f"time >= {start_ms}ms and time <= {end_ms}ms"


def influx_macros(time_filter: str, interval: str, interval_ms: int) -> dict[str, str]:
    """The InfluxQL macros Grafana fills in for a panel or an alert query."""
    return {
        "timeFilter": time_filter,
        "__timeFilter": time_filter,
        "__interval": interval,
        "interval": interval,
        "__interval_ms": str(interval_ms),
    }


def prometheus_macros(interval: str, rate_interval: str, range_: str) -> dict[str, str]:
    """The PromQL macros Grafana fills in for a panel or an alert query."""
    return {
        "__interval": interval,
        "interval": interval,
        "__rate_interval": rate_interval,
        "__range": range_,
    }


def dashboard_variables(dashboard: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The dashboard's template variables."""
    return list(dashboard.get("templating", {}).get("list", []))


def apply_variable_regex(regex: str, values: Sequence[str]) -> list[str]:
    """Values kept by a variable's ``/regex/``, its first group when it has one."""
    if not regex:
        return list(values)
    pattern = re.compile(regex.strip("/"))
    kept: list[str] = []
    for value in values:
        match = pattern.search(value)
        if match:
            kept.append(match.group(1) if pattern.groups else match.group(0))
    return kept


def grafana_duration(milliseconds: int) -> str:
    """An interval as Grafana prints it into a query: ``20s``, ``1m``, ``1h``."""
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if milliseconds % size == 0:
            return f"{milliseconds // size}{unit}"
    return f"{milliseconds}ms"
