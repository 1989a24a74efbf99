"""On/off settings read from environment variables, spelled as people spell them."""

from __future__ import annotations

import os

_OFF = ("0", "false", "off", "no")
_ON = ("1", "true", "on", "yes", "")


def env_switch(name: str, *, on: str, off: str) -> bool:
    """Whether the switch ``name`` is on: unset, empty, ``1``, ``true``, ``on`` or ``yes`` (in any
    case) turn it on; ``0``, ``false``, ``off`` or ``no`` off; any other value raises ValueError,
    naming what ``1`` (``on``) and ``0`` (``off``) do."""
    value = os.environ.get(name, "1").strip().lower()
    if value in _OFF:
        return False
    if value in _ON:
        return True
    raise ValueError(f"{name}={value!r}: use 1 ({on}, the default) or 0 ({off})")
