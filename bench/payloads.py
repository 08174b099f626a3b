"""Benchmark inputs: simulator payloads and malformed messages of every kind."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

from loadmeter.simulate import readings

START_EPOCH = 1764777600
SEED = 20251203
TOO_LARGE_BYTES = 5000


def simulated(
    count: int, nodes: int = 10, ct: int = 2, voltage: bool = True
) -> list[tuple[str, bytes]]:
    """``count`` firmware-exact (node, payload) pairs, the same on every run."""
    names = [f"sim{i}" for i in range(1, nodes + 1)]
    stream = readings(names, ct, voltage, seed=SEED, start_epoch=START_EPOCH)
    return list(itertools.islice(stream, count))


def _truncated(node: str) -> bytes:
    return f'{{"node":"{node}","epoch":{START_EPOCH},"ct1_irms":1.2'.encode()


def _not_utf8(node: str) -> bytes:
    return b'{"node":"' + node.encode() + b'","ct1_irms":"\xff\xfe"}'


def _array(node: str) -> bytes:
    return b"[1.234, 283.820, 230.000]"


def _node_mismatch(node: str) -> bytes:
    return f'{{"node":"{node}x","ct1_irms":1.234}}'.encode()


def _bad_node(node: str) -> bytes:
    return b'{"node":"no spaces allowed!","ct1_irms":1.234}'


def _no_measurements(node: str) -> bytes:
    return (
        f'{{"node":"{node}","epoch":"soon","ct1_irms":"n/a",'
        f'"ct1_apparpower":"nan","ct9_irms":1,"rssi":-70}}'
    ).encode()


def _too_large(node: str) -> bytes:
    head = f'{{"node":"{node}","ct1_irms":1.234,"pad":"'.encode()
    return head + b"x" * (TOO_LARGE_BYTES - len(head) - 2) + b'"}'


MALFORMED: dict[str, Callable[[str], bytes]] = {
    "invalid_json": _truncated,
    "invalid_utf8": _not_utf8,
    "not_object": _array,
    "node_mismatch": _node_mismatch,
    "bad_node": _bad_node,
    "no_measurements": _no_measurements,
    "too_large": _too_large,
}


def malformed(nodes: Sequence[str]) -> list[tuple[str, bytes]]:
    """One rejected message per node in ``nodes``, cycling through every kind."""
    kinds = itertools.cycle(MALFORMED.values())
    return [(node, make(node)) for node, make in zip(nodes, kinds, strict=False)]


def mixed(valid: Sequence[tuple[str, bytes]], every: int) -> list[tuple[str, bytes]]:
    """``valid`` with every ``every``-th message replaced by a malformed one."""
    mix = list(valid)
    spoiled = list(range(every - 1, len(mix), every))
    bad = malformed([mix[index][0] for index in spoiled])
    for index, message in zip(spoiled, bad, strict=True):
        mix[index] = message
    return mix
