"""Every setting ringcomm reads from the environment, parsed in one place.

A setting that is set but cannot be parsed raises ``ValueError`` naming the
variable and the value: a typo (``RINGCOMM_CHECK=flase``) must not silently
mean the default.

=========================  ========  ==================================================
variable                   default   meaning
=========================  ========  ==================================================
RINGCOMM_TIMEOUT           300       seconds one whole all_reduce may take
RINGCOMM_CHECK             on        the same-call check before each all_reduce
RINGCOMM_HEARTBEAT_S       1         seconds between two heartbeats of a process
RINGCOMM_LIVENESS_S        10        seconds of silence after which a peer is dead (0: off)
RINGCOMM_ZMQ_HOST          (unset)   address the zmq transport binds and advertises
RINGCOMM_ZMQ_IPC           on        zmq over ipc:// (not TCP) when all ranks share a host
RINGCOMM_SHM_SLOTS         4         slots per shared-memory queue (shm transport)
RINGCOMM_SHM_SLOT_BYTES    1048576   data bytes per slot (a multiple of 64)
=========================  ========  ==================================================
"""

from __future__ import annotations

import os

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_HEARTBEAT_S",
    "DEFAULT_LIVENESS_S",
    "env_seconds",
    "env_bool",
    "env_int",
    "default_timeout",
    "check_default",
    "heartbeat_s",
    "liveness_s",
]

#: Seconds one whole collective may take when no ``timeout=`` is given.
DEFAULT_TIMEOUT_S = 300.0
#: Seconds between two heartbeats of a process.
DEFAULT_HEARTBEAT_S = 1.0
#: Seconds of silence after which a peer is declared dead or frozen.
DEFAULT_LIVENESS_S = 10.0

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def env_seconds(name: str, default: float, allow_zero: bool = False) -> float:
    """Seconds from environment variable ``name`` (``default`` when unset); ValueError names it."""
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a number of seconds") from None
    if not seconds >= 0 or seconds == float("inf") or (seconds == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'} seconds, got {value!r}")
    return seconds


def env_bool(name: str, default: bool | None) -> bool | None:
    """A yes/no setting: 1/true/yes/on or 0/false/no/off (any case); ``default`` when unset.

    Raises:
        ValueError: the variable is set to anything else.
    """
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{name}={value!r}: expected one of {', '.join(_TRUE)} or {', '.join(_FALSE)}")


def env_int(name: str, default: int, minimum: int = 1) -> int:
    """A whole number from environment variable ``name`` (``default`` when unset); ValueError names it."""
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a whole number") from None
    if number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return number


def default_timeout() -> float:
    """The timeout used when none is given: RINGCOMM_TIMEOUT (seconds) or 300 s."""
    return env_seconds("RINGCOMM_TIMEOUT", DEFAULT_TIMEOUT_S)


def check_default() -> bool:
    """Whether the same-call check runs when ``check=None``: RINGCOMM_CHECK, default on."""
    return bool(env_bool("RINGCOMM_CHECK", True))


def heartbeat_s() -> float:
    """Seconds between heartbeats: RINGCOMM_HEARTBEAT_S or 1 s."""
    return env_seconds("RINGCOMM_HEARTBEAT_S", DEFAULT_HEARTBEAT_S)


def liveness_s() -> float:
    """Seconds of peer silence that count as dead: RINGCOMM_LIVENESS_S or 10 s (0: liveness off)."""
    return env_seconds("RINGCOMM_LIVENESS_S", DEFAULT_LIVENESS_S, allow_zero=True)
