"""Budget: what decoding one body may cost (expanded bytes, nesting depth, parts, seconds), and
``Unscannable``, raised with the reason when a body crosses it or cannot be read at all."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

MiB = 1024 * 1024


class Unscannable(Exception):
    """The body cannot be fully scanned (too big, too deep, too slow, encrypted, broken)."""


@dataclass
class Budget:
    max_expanded: int = 64 * MiB
    max_depth: int = 5
    max_parts: int = 5000
    max_seconds: float = 10.0
    base64_min: int = 64  # base64 at least this long is decoded whatever it holds
    base64_short: int = 12  # shorter base64 from this length is decoded when it is text
    expanded: int = 0
    parts: int = 0
    deadline: float = field(default=0.0)

    def __post_init__(self) -> None:
        if not self.deadline:
            self.deadline = time.monotonic() + self.max_seconds

    @property
    def room(self) -> int:
        """Bytes that may still be expanded."""
        return self.max_expanded - self.expanded

    def too_big(self) -> Unscannable:
        return Unscannable(f"expands to more than {self.max_expanded} bytes")

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise Unscannable(f"took longer than {self.max_seconds:g} s")

    def charge(self, n: int) -> None:
        self.expanded += n
        if self.expanded > self.max_expanded:
            raise self.too_big()
        self.tick()

    def part(self, depth: int) -> None:
        self.parts += 1
        if self.parts > self.max_parts:
            raise Unscannable(f"more than {self.max_parts} parts")
        self.nest(depth)

    def nest(self, depth: int) -> None:
        """A level of nesting that is not a part of its own (an escaped text inside a text)."""
        if depth > self.max_depth:
            raise Unscannable(f"nested deeper than {self.max_depth} levels")
        self.tick()
