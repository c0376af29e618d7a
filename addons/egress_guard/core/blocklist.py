"""Blocklist: compiles category rules into a suffix map and finds the rule that covers a host+path.

Lookup walks the labels of the request host (``a.b.c`` → ``a.b.c``, ``b.c``, ``c``), one dict
probe each, so its cost depends on the host's length, never on how many rules are loaded.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from .hosts import is_ip_literal, normalize_path

Action = Literal["block", "allow"]


@dataclass(frozen=True)
class Reason:
    en: str
    zh: str


@dataclass(frozen=True)
class Rule:
    id: str
    category: str
    action: Action
    reason: Reason
    service: str = ""
    hosts: tuple[str, ...] = ()
    exact_hosts: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    source: str = ""  # "file:line", for messages to the admin


@dataclass(frozen=True)
class _Entry:
    rule: Rule
    exact: bool
    paths: tuple[str, ...]  # normalized prefixes; empty = every path


@dataclass(frozen=True)
class Match:
    rule: Rule
    host_pattern: str
    path_prefix: str  # "" when the rule covers the whole host

    @property
    def specificity(self) -> tuple[int, int, int]:
        return (len(self.host_pattern), len(self.path_prefix), self.rule.action == "allow")


@dataclass
class HostIndex:
    """Suffix map from normalized host pattern to the rules naming it."""

    _by_host: dict[str, list[_Entry]] = field(default_factory=dict)
    rule_count: int = 0

    @classmethod
    def build(cls, rules: Iterable[Rule]) -> HostIndex:
        index = cls()
        for rule in rules:
            index.rule_count += 1
            paths = tuple(normalize_path(p) for p in rule.paths)
            for host in rule.hosts:
                # An IP literal has no subdomains: treat it as exact.
                entry = _Entry(rule, exact=is_ip_literal(host), paths=paths)
                index._by_host.setdefault(host, []).append(entry)
            for host in rule.exact_hosts:
                index._by_host.setdefault(host, []).append(_Entry(rule, exact=True, paths=paths))
        return index

    def _candidates(self, host: str) -> Iterable[tuple[str, _Entry]]:
        entries = self._by_host.get(host)
        if entries:
            for entry in entries:
                yield host, entry
        if is_ip_literal(host):
            return
        dot = host.find(".")
        while dot != -1:
            suffix = host[dot + 1 :]
            entries = self._by_host.get(suffix)
            if entries:
                for entry in entries:
                    if not entry.exact:
                        yield suffix, entry
            dot = host.find(".", dot + 1)

    def lookup(self, host: str, path: str | None) -> Match | None:
        """The most specific rule for a normalized host and raw path.

        path=None asks about the host alone (a CONNECT, before any path is known): only
        rules without path prefixes answer then. The longest host pattern wins, then the
        longest path prefix; on a tie an allow rule beats a block rule.
        """
        best: Match | None = None
        norm_path = normalize_path(path) if path is not None else None
        for pattern, entry in self._candidates(host):
            if entry.paths:
                if norm_path is None:
                    continue
                prefix = next((p for p in entry.paths if norm_path.startswith(p)), None)
                if prefix is None:
                    continue
                match = Match(entry.rule, pattern, prefix)
            else:
                match = Match(entry.rule, pattern, "")
            if best is None or match.specificity > best.specificity:
                best = match
        return best

    def has_path_rules(self, host: str) -> bool:
        """Whether some rule for this host depends on the path (so a tunnel must be opened)."""
        return any(entry.paths for _, entry in self._candidates(host))
