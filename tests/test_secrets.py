"""scripts/generate-secrets.py, run for real in a temporary directory."""

from __future__ import annotations

import importlib.util
import os
import pwd
import stat
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.services import Mosquitto, require

ROOT = Path(__file__).resolve().parent.parent
GENERATOR = ROOT / "scripts" / "generate-secrets.py"
SECRETS = {
    "influx_admin_password",
    "influx_token",
    "grafana_admin_password",
    "mqtt_ingester_password",
    "mqtt_nodes_password",
    "mqtt_healthcheck_password",
}
USERS = {
    "ingester": "mqtt_ingester_password",
    "nodes": "mqtt_nodes_password",
    "healthcheck": "mqtt_healthcheck_password",
}
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")


def load_generator() -> ModuleType:
    """scripts/generate-secrets.py as a module (its name has a dash)."""
    spec = importlib.util.spec_from_file_location("generate_secrets", GENERATOR)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def generate(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the generator on ``directory``; fail the test if it fails."""
    result = run(directory, *args)
    assert result.returncode == 0, result.stderr
    return result


def run(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the generator on ``directory`` and return whatever happened."""
    env = {"PATH": os.environ["PATH"]}
    command = [sys.executable, str(GENERATOR), "--dir", str(directory), *args]
    return subprocess.run(command, check=False, capture_output=True, text=True, env=env)


def snapshot(directory: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file's content, modification time and mode."""
    return {
        path.name: (path.read_bytes(), path.stat().st_mtime_ns, path.stat().st_mode)
        for path in directory.iterdir()
    }


def age(directory: Path) -> None:
    """Backdate every file, so that a rewrite would show in its mtime."""
    for path in directory.iterdir():
        os.utime(path, ns=(10**18, 10**18))


def passwd_lines(directory: Path) -> dict[str, str]:
    """The mosquitto password file as {user: hash}."""
    text = (directory / "mosquitto_passwd").read_text()
    return dict(line.split(":", 1) for line in text.splitlines())


def test_creates_every_secret_with_safe_modes(tmp_path):
    """A first run creates each secret, 0600 in a 0700 directory."""
    directory = tmp_path / "secrets"

    generate(directory)

    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert {p.name for p in directory.iterdir()} == SECRETS | {"mosquitto_passwd"}
    for path in directory.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
    values = [(directory / name).read_text() for name in SECRETS]
    assert all(len(v) == 32 and v.isalnum() for v in values)
    assert len(set(values)) == len(values)
    assert set(passwd_lines(directory)) == set(USERS)


def test_tightens_a_directory_that_others_could_read(tmp_path):
    """An existing secrets directory open to others is closed to 0700."""
    directory = tmp_path / "secrets"
    directory.mkdir(mode=0o755)

    generate(directory)

    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_keeps_existing_secrets_untouched(tmp_path):
    """A second run changes no file: same content, same mtime, same mode."""
    directory = tmp_path / "secrets"
    generate(directory, "--node-users", "node_a")
    age(directory)
    before = snapshot(directory)

    result = generate(directory, "--node-users", "node_a")

    assert snapshot(directory) == before
    assert "already there" in result.stderr


def test_replaces_only_what_is_missing(tmp_path):
    """A deleted secret is made again; the others and their hashes stay."""
    directory = tmp_path / "secrets"
    generate(directory)
    (directory / "mqtt_nodes_password").unlink()
    age(directory)
    before = snapshot(directory)
    hashes = passwd_lines(directory)

    generate(directory)

    after = snapshot(directory)
    changed = {name for name in after if after[name] != before.get(name)}
    assert changed == {"mqtt_nodes_password", "mosquitto_passwd"}
    new_hashes = passwd_lines(directory)
    assert new_hashes["nodes"] != hashes["nodes"]
    assert {u: h for u, h in new_hashes.items() if u != "nodes"} == {
        u: h for u, h in hashes.items() if u != "nodes"
    }


def test_keeps_lines_of_users_added_by_hand(tmp_path):
    """Users someone added to mosquitto_passwd themselves are kept."""
    directory = tmp_path / "secrets"
    generate(directory)
    line = f"homeassistant:{load_generator().hash_password('their own')}"
    with (directory / "mosquitto_passwd").open("a") as passwd:
        passwd.write(line + "\n")
    (directory / "mqtt_ingester_password").write_text("chosen by hand\n")

    generate(directory)

    lines = (directory / "mosquitto_passwd").read_text().splitlines()
    assert line in lines
    assert load_generator().hash_matches(
        passwd_lines(directory)["ingester"], "chosen by hand"
    )


def test_adds_per_node_users(tmp_path):
    """--node-users makes a password and a password-file line per node."""
    directory = tmp_path / "secrets"
    generate(directory)

    generate(directory, "--node-users", "node_a, node-b")

    assert (directory / "mqtt_node_node_a_password").exists()
    assert (directory / "mqtt_node_node-b_password").exists()
    assert set(passwd_lines(directory)) == set(USERS) | {"node_a", "node-b"}


@pytest.mark.parametrize("node", ["_ingester", "ingester", "a/b", "a:b", "+"])
def test_refuses_node_ids_that_are_not_plain_names(tmp_path, node):
    """A node user that would clash or could not be a topic level is refused."""
    directory = tmp_path / "secrets"

    result = run(directory, "--node-users", node)

    assert result.returncode == 1
    assert "MQTT node user" in result.stderr
    assert not directory.exists()


def test_refuses_an_empty_secret(tmp_path):
    """An emptied password file is an error, not an empty password."""
    directory = tmp_path / "secrets"
    generate(directory)
    (directory / "mqtt_nodes_password").write_text("\n")

    result = run(directory)

    assert result.returncode == 1
    assert "mqtt_nodes_password is empty" in result.stderr


def test_prints_no_secret(tmp_path):
    """Neither stdout nor stderr ever holds a generated secret."""
    directory = tmp_path / "secrets"
    runs = [generate(directory, "--node-users", "node_a")]
    (directory / "mqtt_nodes_password").unlink()
    runs.append(generate(directory, "--node-users", "node_a"))
    runs.append(generate(directory, "--node-users", "node_a"))
    if os.geteuid() == 0:
        runs.append(generate(directory, "--install", str(tmp_path / "run")))

    secrets = [
        p.read_text() for p in directory.iterdir() if p.name != "mosquitto_passwd"
    ]
    secrets += passwd_lines(directory).values()
    output = "".join(r.stdout + r.stderr for r in runs)
    assert runs[0].stdout == ""
    assert len(secrets) == 7 + 4
    assert not [s for s in secrets if s in output]


def test_hashes_match_those_of_mosquitto_passwd(tmp_path):
    """Our check accepts mosquitto_passwd's hashes and rejects a wrong password."""
    passwd = tmp_path / "passwd"
    tool = require("mosquitto_passwd")
    subprocess.run([tool, "-c", "-b", passwd, "someone", "s3cret"], check=True)
    stored = passwd.read_text().strip().split(":", 1)[1]
    generator = load_generator()

    assert generator.hash_matches(stored, "s3cret")
    assert not generator.hash_matches(stored, "s3cret!")
    assert generator.hash_password("x").startswith("$7$101$")


def test_mosquitto_accepts_the_generated_password_file(tmp_path):
    """A real mosquitto logs every generated user in, and refuses wrong passwords."""
    directory = tmp_path / "secrets"
    generate(directory, "--node-users", "node_a")
    broker = Mosquitto(
        tmp_path,
        config=(
            f"user {pwd.getpwuid(os.geteuid()).pw_name}\n"
            "listener {port} 127.0.0.1\n"
            "allow_anonymous false\n"
            f"password_file {directory / 'mosquitto_passwd'}\n"
        ),
    )
    broker.start()
    logins = dict(USERS, node_a="mqtt_node_node_a_password")

    try:
        accepted = {
            user: login(broker, user, (directory / file).read_text())
            for user, file in logins.items()
        }
        refused = login(broker, "nodes", "wrong")
    finally:
        broker.stop()

    assert accepted == dict.fromkeys(logins, 0)
    assert refused != 0


def login(broker: Mosquitto, user: str, password: str) -> int:
    """Publish once as ``user``; mosquitto_pub's exit status."""
    command = [require("mosquitto_pub"), "-h", "127.0.0.1", "-p", str(broker.port)]
    command += ["-u", user, "-P", password, "-t", "t", "-m", "m"]
    result = subprocess.run(command, check=False, capture_output=True, timeout=10)
    return result.returncode


@as_root
def test_install_gives_each_container_its_files(tmp_path):
    """--install copies the containers' secrets with their owners and modes."""
    directory, target = tmp_path / "secrets", tmp_path / "run"
    generate(directory, "--install", str(target))
    age(target)
    before = snapshot(target)

    generate(directory, "--install", str(target))

    assert stat.S_IMODE(target.stat().st_mode) == 0o711
    for item in load_generator().INSTALLED:
        info = (target / item.name).stat()
        assert (info.st_uid, info.st_gid) == item.owner, item.name
        assert stat.S_IMODE(info.st_mode) == item.mode, item.name
        assert (target / item.name).read_bytes() == (directory / item.name).read_bytes()
    assert snapshot(target) == before


@as_root
def test_files_root_makes_belong_to_the_directory_owner(tmp_path):
    """Run as root (the compose job), new files belong to the host user's directory."""
    directory = tmp_path / "secrets"
    directory.mkdir(mode=0o700)
    os.chown(directory, 1234, 5678)

    generate(directory)

    owners = {(p.stat().st_uid, p.stat().st_gid) for p in directory.iterdir()}
    assert owners == {(1234, 5678)}


def test_install_needs_root(tmp_path):
    """Without root, --install explains itself instead of half-working."""
    if os.geteuid() == 0:
        pytest.skip("runs as root")
    result = run(tmp_path / "secrets", "--install", str(tmp_path / "run"))

    assert result.returncode == 1
    assert "run as root" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, as the secrets job has")
def test_a_root_owned_directory_is_handed_to_the_checkout_owner(tmp_path):
    """A secrets dir Docker created as root goes to the owner of --owner-from."""
    directory = tmp_path / "secrets"
    directory.mkdir()
    marker = tmp_path / "generate-secrets.py"
    marker.write_text("")
    os.chown(marker, 1234, 5678)

    generate(directory, f"--owner-from={marker}")

    for path in [directory, *directory.iterdir()]:
        info = path.stat()
        assert (info.st_uid, info.st_gid) == (1234, 5678), path
