"""Grafana provisioning, dashboards and alert rules: checked statically, and
every InfluxQL query run against a real influxd loaded with readings in the
exact data model."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests import grafana_queries as gq
from tests.services import Influxd1

DATASOURCE_TYPES = {"influxdb": "influxdb", "prometheus": "prometheus"}
DASHBOARD_UIDS = {"loadmeter-overview", "loadmeter-ingester"}
ALERT_UIDS = {
    "loadmeter-node-silent",
    "loadmeter-ingester-down",
    "loadmeter-spool-old",
    "loadmeter-mqtt-disconnected",
    "loadmeter-write-refused",
    "loadmeter-readings-lost",
    "loadmeter-nothing-stored",
}
DASHBOARDS_MOUNT = "/etc/grafana/dashboards"
HOME_DASHBOARD_PATH = f"{DASHBOARDS_MOUNT}/loadmeter-overview.json"
AUTH_HEADER_VALUE = "Token $__file{/run/secrets/influx_token}"
NO_DATA_STATES = {"NoData", "Alerting", "OK", "KeepLast"}
EXEC_ERR_STATES = {"Error", "Alerting", "OK", "KeepLast"}

DATABASE = "grafana_queries"
NODES = ("sim1", "sim2")
CHANNELS = ("ct1", "ct2")
READING_SPACING_S = 10
HISTORY_S = 3 * 3600
SIM2_GAP_S = (3600, 4200)

DASHBOARDS = gq.load_dashboards()
RULES = gq.load_alert_rules()
INFLUX_QUERIES = gq.all_queries("influxdb")


def _datasources() -> list[dict[str, Any]]:
    files = sorted((gq.PROVISIONING_DIR / "datasources").glob("*.y*ml"))
    return [ds for path in files for ds in gq.load_yaml(path)["datasources"]]


def _datasource(uid: str) -> dict[str, Any]:
    return next(ds for ds in _datasources() if ds["uid"] == uid)


def _panels() -> list[tuple[str, dict[str, Any]]]:
    return [
        (board["uid"], panel)
        for board in DASHBOARDS.values()
        for panel in gq.query_panels(board)
    ]


PANELS = _panels()
PANEL_IDS = [f"{uid}/panel-{panel['id']}" for uid, panel in PANELS]


# Provisioning files


def test_datasources_have_pinned_uids_and_types() -> None:
    """Exactly the InfluxDB and Prometheus data sources are provisioned, uids pinned."""
    found = {ds["uid"]: ds["type"] for ds in _datasources()}

    assert found == DATASOURCE_TYPES


def test_datasources_are_read_only_in_the_ui() -> None:
    """Provisioned data sources cannot be edited in the UI and drift from the file."""
    assert all(ds["editable"] is False for ds in _datasources())


def test_influx_datasource_speaks_influxql_to_the_bucket() -> None:
    """InfluxDB is queried with InfluxQL, database = the bucket from INFLUX_BUCKET."""
    influx = _datasource("influxdb")

    assert influx["url"] == "http://influxdb:8086"
    assert influx["jsonData"]["version"] == "InfluxQL"
    assert influx["jsonData"]["dbName"] in ("$INFLUX_BUCKET", "${INFLUX_BUCKET}")
    assert influx["jsonData"]["httpMode"] == "POST"


def test_influx_datasource_reads_its_token_from_the_secret_file() -> None:
    """The Authorization header carries the token read from the mounted secret."""
    influx = _datasource("influxdb")
    text = "\n".join(
        p.read_text() for p in (gq.PROVISIONING_DIR / "datasources").glob("*.y*ml")
    )

    assert influx["jsonData"]["httpHeaderName1"] == "Authorization"
    assert influx["secureJsonData"]["httpHeaderValue1"] == AUTH_HEADER_VALUE
    assert f'"{AUTH_HEADER_VALUE}"' in text


def test_prometheus_datasource_matches_the_scrape_interval() -> None:
    """Prometheus is reached by service name and knows the 15 s scrape interval."""
    prometheus = _datasource("prometheus")

    assert prometheus["url"] == "http://prometheus:9090"
    assert prometheus["jsonData"]["timeInterval"] == "15s"


def test_dashboard_provider_reads_the_mounted_dashboards() -> None:
    """The file provider loads the mounted dashboards into the loadmeter folder."""
    files = sorted((gq.PROVISIONING_DIR / "dashboards").glob("*.y*ml"))
    providers = [p for path in files for p in gq.load_yaml(path)["providers"]]

    assert [p["options"]["path"] for p in providers] == [DASHBOARDS_MOUNT]
    assert providers[0]["type"] == "file"
    assert providers[0]["folder"] == "loadmeter"


def test_home_dashboard_path_names_the_overview() -> None:
    """GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH's value is the overview's file."""
    name = HOME_DASHBOARD_PATH.removeprefix(DASHBOARDS_MOUNT + "/")

    assert DASHBOARDS[name]["uid"] == "loadmeter-overview"


# Dashboards


def test_dashboards_have_the_stable_uids() -> None:
    """Both dashboards exist with their fixed uids, each in a file named after it."""
    uids = [board["uid"] for board in DASHBOARDS.values()]

    assert sorted(uids) == sorted(DASHBOARD_UIDS)
    assert all(name == f"{b['uid']}.json" for name, b in DASHBOARDS.items())


@pytest.mark.parametrize("board", DASHBOARDS.values(), ids=list(DASHBOARDS))
def test_dashboard_uses_the_modern_schema(board: dict[str, Any]) -> None:
    """Dashboards use the current JSON model and are read-only in the UI."""
    assert board["schemaVersion"] >= 39
    assert board["editable"] is False
    assert board.get("id") is None


@pytest.mark.parametrize("board", DASHBOARDS.values(), ids=list(DASHBOARDS))
def test_panel_ids_are_unique(board: dict[str, Any]) -> None:
    """Panel ids are unique per dashboard, so alert links and URLs stay exact."""
    ids = [panel["id"] for panel in gq.iter_panels(board)]

    assert len(ids) == len(set(ids))


@pytest.mark.parametrize(("uid", "panel"), PANELS, ids=PANEL_IDS)
def test_panel_queries_a_provisioned_datasource(uid: str, panel: dict) -> None:
    """Each panel names a provisioned data source by uid and type and has a query."""
    sources = [panel["datasource"]] + [
        t["datasource"] for t in panel["targets"] if "datasource" in t
    ]

    assert panel["targets"]
    assert all(gq.target_text(t).strip() for t in panel["targets"])
    assert all(DATASOURCE_TYPES.get(s["uid"]) == s["type"] for s in sources)


@pytest.mark.parametrize(("uid", "panel"), PANELS, ids=PANEL_IDS)
def test_influx_panels_use_raw_influxql(uid: str, panel: dict) -> None:
    """InfluxDB targets are raw InfluxQL, the form these tests can execute."""
    for target in panel["targets"]:
        if panel["datasource"]["uid"] == "influxdb":
            assert target["rawQuery"] is True
            assert "$timeFilter" in target["query"]


@pytest.mark.parametrize(("uid", "panel"), PANELS, ids=PANEL_IDS)
def test_panel_has_title_and_description(uid: str, panel: dict) -> None:
    """Every panel says what it shows."""
    assert panel["title"].strip()
    assert panel["description"].strip()


def test_energy_panel_states_its_limits() -> None:
    """The energy estimate states how it treats gaps and avoids integral()."""
    overview = DASHBOARDS["loadmeter-overview.json"]
    energy = [p for p in gq.query_panels(overview) if "nergy" in p["title"]]

    assert energy
    for panel in energy:
        assert "integral(" not in gq.target_text(panel["targets"][0])
        assert "gap" in panel["description"]


def test_overview_variables_query_the_influx_datasource() -> None:
    """The node and channel variables are multi-value InfluxQL queries."""
    variables = gq.dashboard_variables(DASHBOARDS["loadmeter-overview.json"])

    assert [v["name"] for v in variables] == ["node", "channel"]
    for variable in variables:
        assert variable["datasource"] == {"type": "influxdb", "uid": "influxdb"}
        assert variable["multi"] is True
        assert variable["includeAll"] is True


def test_repeated_rows_repeat_over_a_defined_variable() -> None:
    """A row repeated per channel names a variable the dashboard defines."""
    for board in DASHBOARDS.values():
        names = {v["name"] for v in gq.dashboard_variables(board)}
        repeats = {p["repeat"] for p in gq.iter_panels(board) if p.get("repeat")}
        assert repeats <= names


# Alert rules


def test_alert_rules_have_the_stable_uids() -> None:
    """The alert rules exist with their fixed, unique uids."""
    uids = [rule["uid"] for rule in RULES]

    assert sorted(uids) == sorted(ALERT_UIDS)


def test_alert_groups_live_in_the_loadmeter_folder() -> None:
    """Rule groups name their folder and evaluation interval."""
    for group in gq.load_alert_groups():
        assert group["folder"] == "loadmeter"
        assert re.fullmatch(r"\d+[smh]", group["interval"])


@pytest.mark.parametrize("rule", RULES, ids=[r["uid"] for r in RULES])
def test_alert_rule_queries_provisioned_datasources(rule: dict[str, Any]) -> None:
    """Each data query names a provisioned uid, a time range and a matching model."""
    for item in rule["data"]:
        if item["datasourceUid"] == gq.EXPRESSION_UID:
            continue
        assert item["datasourceUid"] in DATASOURCE_TYPES
        assert item["model"]["datasource"]["uid"] == item["datasourceUid"]
        assert item["relativeTimeRange"]["from"] > item["relativeTimeRange"]["to"]
        assert gq.target_text(item["model"]).strip()


@pytest.mark.parametrize("rule", RULES, ids=[r["uid"] for r in RULES])
def test_alert_rule_queries_use_no_dashboard_variables(rule: dict) -> None:
    """Alert queries use only server-side macros, never dashboard variables."""
    macros = gq.influx_macros("time > 0", "1s", 1000) | gq.prometheus_macros(
        "1s", "1m", "5m"
    )
    for item in rule["data"]:
        if item["datasourceUid"] != gq.EXPRESSION_UID:
            gq.substitute(gq.target_text(item["model"]), macros)


@pytest.mark.parametrize("rule", RULES, ids=[r["uid"] for r in RULES])
def test_alert_rule_condition_is_a_server_side_expression(rule: dict) -> None:
    """The condition is a threshold or math expression over existing refIds."""
    by_ref = {item["refId"]: item for item in rule["data"]}
    condition = by_ref[rule["condition"]]

    assert condition["datasourceUid"] == gq.EXPRESSION_UID
    assert condition["model"]["type"] in ("threshold", "math")
    for item in by_ref.values():
        if item["datasourceUid"] == gq.EXPRESSION_UID:
            refs = re.findall(r"\$?\b([A-Z])\b", item["model"]["expression"])
            assert set(refs) <= set(by_ref) - {item["refId"]}


@pytest.mark.parametrize("rule", RULES, ids=[r["uid"] for r in RULES])
def test_alert_rule_states_and_timing_are_valid(rule: dict[str, Any]) -> None:
    """No-data and error states are valid values and the pending period parses."""
    assert rule["noDataState"] in NO_DATA_STATES
    assert rule["execErrState"] in EXEC_ERR_STATES
    assert re.fullmatch(r"\d+[smh]", rule["for"])
    assert rule["annotations"]["summary"].strip()


@pytest.mark.parametrize("rule", RULES, ids=[r["uid"] for r in RULES])
def test_alert_rule_links_an_existing_panel(rule: dict[str, Any]) -> None:
    """The dashboard and panel an alert links to both exist."""
    board = DASHBOARDS[f"{rule['dashboardUid']}.json"]
    ids = {panel["id"] for panel in gq.query_panels(board)}

    assert rule["panelId"] in ids


def test_ingester_down_alerts_when_the_target_is_missing() -> None:
    """A vanished ingester target (no data) fires the ingester-down rule too."""
    rule = next(r for r in RULES if r["uid"] == "loadmeter-ingester-down")

    assert rule["noDataState"] == "Alerting"
    assert rule["execErrState"] == "Alerting"


# The helper's rendering of Grafana variables


def test_multi_value_variable_renders_as_an_escaped_alternation() -> None:
    """Several values become an escaped ``(a|b)``, as Grafana writes them."""
    assert gq.regex_value(["sim1", "sim2"]) == "(sim1|sim2)"
    assert gq.regex_value(["a.b", "c/d"]) == r"(a\.b|c\/d)"
    assert gq.regex_value(["sim1"]) == "sim1"


def test_substitute_handles_every_variable_syntax() -> None:
    """``$x``, ``${x}``, ``${x:fmt}`` and ``[[x]]`` are all replaced."""
    text = 'SELECT "${ch}_power" WHERE /^$node$/ AND [[f]] ${ch:raw}'

    rendered = gq.substitute(text, {"ch": "ct1", "node": "(a|b)", "f": "x"})

    assert rendered == 'SELECT "ct1_power" WHERE /^(a|b)$/ AND x ct1'


def test_substitute_refuses_an_undefined_variable() -> None:
    """A query naming a variable nobody defines fails instead of passing through."""
    with pytest.raises(KeyError, match="nodes"):
        gq.substitute("WHERE /^$nodes$/", {"node": "a"})


# Queries against a real influxd


def _reading_line(node: str, stamp_s: int) -> str:
    """One reading in the exact data model: float measurements, integer counters."""
    phase = stamp_s / 600.0
    uptime_ms = (stamp_s % 86_400) * 1000
    vrms = 230.0 + 3.0 * math.sin(phase)
    fields = []
    for index, channel in enumerate(CHANNELS, start=1):
        power = 150.0 * index + 100.0 * math.sin(phase * index)
        if node == "sim2" and channel == "ct2":
            power = -abs(power) - 50.0
        apparent = abs(power) / 0.9
        fields += [
            f"{channel}_irms={apparent / vrms:.3f}",
            f"{channel}_apparpower={apparent:.3f}",
            f"{channel}_power={power:.3f}",
        ]
    fields += [f"vrms={vrms:.3f}", f"epoch={stamp_s}i", f"t_ms={uptime_ms}i"]
    return f"load_meter,node={node} {','.join(fields)} {stamp_s * 1000}"


def _simulated_readings(end_s: int) -> Iterator[str]:
    """Readings every 10 s for 3 h up to ``end_s``; sim2 has a 10-minute gap."""
    for offset in range(HISTORY_S, -1, -READING_SPACING_S):
        for node in NODES:
            if node == "sim2" and SIM2_GAP_S[0] <= offset < SIM2_GAP_S[1]:
                continue
            yield _reading_line(node, end_s - offset)


@pytest.fixture(scope="module")
def influx(influxd1: Influxd1) -> Iterator[Influxd1]:
    """The shared influxd with a database of simulated readings ending now."""
    influxd1.query(f'DROP DATABASE "{DATABASE}"')
    influxd1.query(f'CREATE DATABASE "{DATABASE}"')

    lines = "\n".join(_simulated_readings(int(time.time())))
    status, body = influxd1.write(DATABASE, lines)

    assert status == 204, body
    yield influxd1
    influxd1.query(f'DROP DATABASE "{DATABASE}"')


def _statement(answer: dict[str, Any]) -> dict[str, Any]:
    """The single statement result of an InfluxQL answer; errors fail the test."""
    assert "error" not in answer, answer
    results = answer["results"]
    assert isinstance(results, list)
    assert len(results) == 1
    assert "error" not in results[0], results[0]
    return dict(results[0])


def _values(statement: dict[str, Any]) -> list[Any]:
    """Every non-time value in every series of a statement result."""
    return [
        value
        for series in statement.get("series", [])
        for row in series["values"]
        for column, value in zip(series["columns"], row, strict=True)
        if column != "time"
    ]


def _variable_values(influx: Influxd1, name: str) -> list[str]:
    """What Grafana lists for an overview variable, run against influxd."""
    board = DASHBOARDS["loadmeter-overview.json"]
    variable = next(v for v in gq.dashboard_variables(board) if v["name"] == name)
    statement = _statement(influx.query(gq.variable_query_text(variable), DATABASE))
    column = 1 if _is_tag_values_query(variable) else 0
    raw = [str(row[column]) for s in statement["series"] for row in s["values"]]
    return gq.apply_variable_regex(variable.get("regex", ""), raw)


def _is_tag_values_query(variable: dict[str, Any]) -> bool:
    """Grafana takes SHOW TAG VALUES' second column and other answers' first."""
    return "show tag values" in gq.variable_query_text(variable).lower()


def test_node_variable_lists_every_node(influx: Influxd1) -> None:
    """The node variable's query lists exactly the nodes that stored readings."""
    assert sorted(_variable_values(influx, "node")) == list(NODES)


def test_channel_variable_lists_every_ct_channel(influx: Influxd1) -> None:
    """The channel variable's query and regex list exactly the stored CT channels."""
    assert sorted(_variable_values(influx, "channel")) == list(CHANNELS)


VARIANTS = {
    "browser-all-nodes-ct1": ("relative", list(NODES), "ct1"),
    "server-one-node-ct2": ("absolute", ["sim1"], "ct2"),
}


def _render(query: gq.Query, variant: str) -> str:
    """``query`` as Grafana would send it to InfluxDB in ``variant``."""
    style, nodes, channel = VARIANTS[variant]
    if style == "relative":
        duration = gq.grafana_duration(query.range_seconds * 1000)
        time_filter = gq.influx_relative_time_filter(duration)
    else:
        end_ms = int(time.time() * 1000)
        start_ms = end_ms - query.range_seconds * 1000
        time_filter = gq.influx_absolute_time_filter(start_ms, end_ms)
    interval = gq.grafana_duration(query.interval_ms)
    values = gq.influx_macros(time_filter, interval, query.interval_ms)
    values |= {"node": gq.regex_value(nodes), "channel": channel}
    return gq.substitute(query.text, values)


def test_influxql_queries_exist() -> None:
    """The dashboards and alert rules hold InfluxQL queries for the next test."""
    assert len(INFLUX_QUERIES) >= 8


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("query", INFLUX_QUERIES, ids=str)
def test_influxql_query_runs_and_returns_data(
    influx: Influxd1, query: gq.Query, variant: str
) -> None:
    """Each InfluxQL query, rendered as Grafana renders it, answers with data."""
    statement = _statement(influx.query(_render(query, variant), DATABASE))

    assert statement.get("series"), f"no series for {query.text}"
    assert any(v is not None for v in _values(statement))
