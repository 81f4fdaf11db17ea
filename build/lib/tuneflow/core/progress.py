"""Saying a state once, when it changes: the progress lines of a wait that polls."""

from __future__ import annotations

from typing import Callable, Hashable


class StateLog:
    """``note(key, text)`` passes ``text`` to ``say`` only when it differs from the last text noted for ``key``."""

    def __init__(self, say: Callable[[str], None]):
        self.say, self.seen = say, {}

    def note(self, key: Hashable, text: str) -> None:
        if self.seen.get(key) != text:
            self.seen[key] = text
            self.say(text)
