#!/usr/bin/env python3
"""Create the stack's missing secrets, never overwriting or printing one.

Runs on the host (``make secrets``) and in the compose ``secrets`` job, with
the standard library only. In the secrets directory (default ``./secrets``)
it creates each missing password or token file, mode 0600 in a 0700
directory, and keeps ``mosquitto_passwd`` (mosquitto 2.x PBKDF2-SHA512
hashes) in step with the MQTT password files: a line is rewritten only when
its hash no longer matches, and lines for other users are kept.

To choose a password yourself, write it into its file and run this again.

With ``--install DIR`` (root only, used by the compose job) it also copies
the secrets each container needs into DIR, owned by the user that container
runs as, because a bind-mounted host file keeps the host's owner and mode.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import os
import re
import secrets
import string
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ALPHABET = string.ascii_letters + string.digits
SECRET_LENGTH = 32  # about 190 bits; letters and digits survive any quoting

# mosquitto_passwd's defaults: PBKDF2-SHA512, 101 rounds, 12-byte salt. The
# passwords are random, so more rounds would only slow every node's login.
HASH_ROUNDS = 101
SALT_BYTES = 12
HASHED_LOGINS = "mosquitto_passwd"

# The users containers run as, from their images (uid, gid).
ROOT = (0, 0)
INFLUXDB = 1000  # influxdb:2.x; its entrypoint reads the *_FILE secrets
GRAFANA = (472, 0)  # grafana/grafana: user grafana, group root
MOSQUITTO = (1883, 1883)  # eclipse-mosquitto drops from root to this user
LOADMETER = (10001, 10001)  # services/ingester/Dockerfile; grafana joins the group

NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
FIXED_USERS = {
    "ingester": "mqtt_ingester_password",
    "nodes": "mqtt_nodes_password",
    "healthcheck": "mqtt_healthcheck_password",
}


@dataclass(frozen=True)
class Installed:
    """Where a container finds one secret, and who may read it there."""

    name: str
    owner: tuple[int, int]
    mode: int


INSTALLED = (
    Installed("influx_admin_password", (INFLUXDB, 0), 0o400),
    Installed("influx_token", (INFLUXDB, LOADMETER[1]), 0o440),
    Installed("grafana_admin_password", GRAFANA, 0o400),
    Installed("mqtt_ingester_password", LOADMETER, 0o400),
    Installed("mqtt_nodes_password", LOADMETER, 0o400),  # the demo simulator
    Installed("mqtt_healthcheck_password", ROOT, 0o400),  # mosquitto's check
    Installed(HASHED_LOGINS, MOSQUITTO, 0o400),
)
GENERATED = tuple(i.name for i in INSTALLED if i.name != HASHED_LOGINS)


class SecretsError(Exception):
    """A problem the operator has to fix; the message says what to do."""


def node_password_file(node: str) -> str:
    """The file holding the password of the per-node MQTT user ``node``."""
    return f"mqtt_node_{node}_password"


def parse_node_users(text: str) -> list[str]:
    """Node ids from a comma- or space-separated list, validated."""
    nodes = [n for n in re.split(r"[\s,]+", text.strip()) if n]
    for node in nodes:
        if not NODE_ID.match(node) or node in FIXED_USERS:
            raise SecretsError(
                f"MQTT node user {node!r}: expected a node id of letters, digits,"
                f" '_' and '-' (not starting with '_' or '-'), other than"
                f" {', '.join(sorted(FIXED_USERS))}"
            )
    return sorted(set(nodes))


def random_secret() -> str:
    """A fresh random password or token."""
    return "".join(secrets.choice(ALPHABET) for _ in range(SECRET_LENGTH))


def hash_password(password: str, salt: bytes | None = None) -> str:
    """The mosquitto 2.x ``$7$`` hash of ``password``."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, HASH_ROUNDS)
    encode = base64.b64encode
    return f"$7${HASH_ROUNDS}${encode(salt).decode()}${encode(digest).decode()}"


def hash_matches(stored: str, password: str) -> bool:
    """Whether a ``$7$`` hash from a password file is that of ``password``."""
    parts = stored.split("$")
    if len(parts) != 5 or parts[1] != "7" or not parts[2].isdigit():
        return False
    try:
        salt = base64.b64decode(parts[3], validate=True)
        expected = base64.b64decode(parts[4], validate=True)
    except ValueError:
        return False
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(parts[2]))
    return hmac.compare_digest(digest, expected)


def read_secret(path: Path) -> str:
    """The secret in ``path``, surrounding whitespace removed as consumers do."""
    value = path.read_text(encoding="utf-8").strip()
    if not value:
        raise SecretsError(f"{path} is empty: delete it to have a new one made")
    return value


def write_new(path: Path, text: str, mode: int = 0o600) -> bool:
    """Atomically create ``path`` holding ``text``; False if it already exists."""
    tmp = _write_temp(path.parent, text, mode, _owner_of(path.parent))
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    return True


def replace(
    path: Path, text: str, mode: int = 0o600, owner: tuple[int, int] | None = None
) -> None:
    """Atomically replace ``path`` with ``text``, mode and owner."""
    owner = _owner_of(path.parent) if owner is None else owner
    os.replace(_write_temp(path.parent, text, mode, owner), path)


def _owner_of(directory: Path) -> tuple[int, int] | None:
    """Files root makes belong to whoever owns the directory."""
    if os.geteuid() != 0:
        return None
    info = directory.stat()
    return info.st_uid, info.st_gid


def _write_temp(
    directory: Path, text: str, mode: int, owner: tuple[int, int] | None
) -> str:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        os.fchmod(fd, mode)
        if owner is not None:
            os.fchown(fd, *owner)
        os.write(fd, text.encode())
        os.fsync(fd)
    except BaseException:
        os.unlink(tmp)
        raise
    finally:
        os.close(fd)
    return tmp


def prepare_dir(directory: Path, owner_from: Path | None = None) -> None:
    """Create the secrets directory, or tighten it, to mode 0700.

    Run as root on a directory root owns (Docker creates a missing bind
    mount that way), hand it to the owner of ``owner_from``: the user who
    checked out the project can then read it with ``make credentials``.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if directory.stat().st_mode & 0o077:
        directory.chmod(0o700)
    if owner_from is not None and os.geteuid() == 0 and directory.stat().st_uid == 0:
        info = owner_from.stat()
        if info.st_uid != 0:
            os.chown(directory, info.st_uid, info.st_gid)


def ensure_secrets(directory: Path, names: list[str]) -> list[str]:
    """Create each missing secret file; the names of those created."""
    created = []
    for name in names:
        path = directory / name
        if not path.exists() and write_new(path, random_secret()):
            created.append(name)
    return created


def sync_passwd(directory: Path, users: dict[str, str]) -> list[str]:
    """Bring ``mosquitto_passwd`` in line with the password files.

    ``users`` maps MQTT user names to their password file names. Returns the
    users whose line was written; the file is untouched when none was.
    """
    path = directory / HASHED_LOGINS
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    lines = [line for line in old.splitlines() if line.strip()]
    index = {line.split(":", 1)[0]: i for i, line in enumerate(lines)}
    changed = []
    for user, file_name in users.items():
        password = read_secret(directory / file_name)
        at = index.get(user)
        if at is not None and hash_matches(lines[at].split(":", 1)[1], password):
            continue
        entry = f"{user}:{hash_password(password)}"
        if at is None:
            index[user] = len(lines)
            lines.append(entry)
        else:
            lines[at] = entry
        changed.append(user)
    if changed:
        replace(path, "".join(f"{line}\n" for line in lines))
    return changed


def install(source: Path, target: Path) -> list[str]:
    """Copy the containers' secrets into ``target`` with their owners and modes.

    Files already right are left alone; the names of those written.
    """
    if os.geteuid() != 0:
        raise SecretsError("--install sets file owners for the containers: run as root")
    target.mkdir(parents=True, exist_ok=True)
    target.chmod(0o711)  # containers open their own files but cannot list
    written = []
    for item in INSTALLED:
        text = (source / item.name).read_text(encoding="utf-8")
        path = target / item.name
        if not _installed_as(path, text, item):
            replace(path, text, item.mode, item.owner)
            written.append(item.name)
    return written


def _installed_as(path: Path, text: str, item: Installed) -> bool:
    try:
        info = path.stat()
        same = path.read_text(encoding="utf-8") == text
    except FileNotFoundError:
        return False
    owner = (info.st_uid, info.st_gid)
    return same and owner == item.owner and info.st_mode & 0o7777 == item.mode


def generate(
    directory: Path,
    nodes: list[str],
    target: Path | None,
    owner_from: Path | None = None,
) -> None:
    """Do the whole job, reporting file names (never contents) on stderr."""
    prepare_dir(directory, owner_from)
    users = dict(FIXED_USERS) | {n: node_password_file(n) for n in nodes}
    created = ensure_secrets(directory, [*GENERATED, *users.values()])
    hashed = sync_passwd(directory, users)
    _report("created", created, directory)
    _report(f"{HASHED_LOGINS}: wrote the line of", hashed, directory)
    if target is not None:
        _report("installed", install(directory, target), target)
    if not created and not hashed:
        _say(f"{directory}: every secret was already there")


def _report(verb: str, names: list[str], directory: Path) -> None:
    if names:
        _say(f"{directory}: {verb} {', '.join(names)}")


def _say(text: str) -> None:
    """Tell the operator on stderr; stdout stays empty."""
    sys.stderr.write(f"{text}\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; defaults come from SECRETS_DIR and MQTT_NODE_USERS."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(os.environ.get("SECRETS_DIR") or "secrets"),
        help="the secrets directory (default: $SECRETS_DIR or ./secrets)",
    )
    parser.add_argument(
        "--node-users",
        default=os.environ.get("MQTT_NODE_USERS", ""),
        help="per-node MQTT users to add, named after their node ids"
        " (default: $MQTT_NODE_USERS)",
    )
    parser.add_argument(
        "--install",
        type=Path,
        metavar="DIR",
        help="also copy the secrets into DIR owned as each container needs",
    )
    parser.add_argument(
        "--owner-from",
        type=Path,
        metavar="PATH",
        help="as root, give a root-owned secrets directory to PATH's owner",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 on success, 1 with a message on stderr otherwise."""
    args = parse_args(argv)
    try:
        generate(
            args.dir, parse_node_users(args.node_users), args.install, args.owner_from
        )
    except (SecretsError, OSError) as exc:
        _say(f"generate-secrets: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
