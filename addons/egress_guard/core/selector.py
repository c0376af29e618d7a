"""Selector: whom and where an override applies to — destination hosts or categories, users,
groups. Every override (upload caps, marker actions) selects the same way."""

from __future__ import annotations

from dataclasses import dataclass

from .blocklist import HostIndex


@dataclass(frozen=True)
class Selector:
    hosts: HostIndex | None = None  # destination hosts (None = any)
    categories: frozenset[str] = frozenset()  # destination policy categories (empty = any)
    users: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()

    def applies(self, user: str, groups: tuple[str, ...], host: str, category: str) -> bool:
        """All the selectors given must match."""
        if self.users and user not in self.users:
            return False
        if self.groups and not self.groups.intersection(groups):
            return False
        if self.categories and category not in self.categories:
            return False
        return not (self.hosts is not None and self.hosts.lookup(host, None) is None)
