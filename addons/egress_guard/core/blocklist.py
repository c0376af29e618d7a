"""Blocklist: compiles category rules into a suffix map and finds the rule that covers a host+path.

Lookup walks the labels of the request host (``a.b.c`` → ``a.b.c``, ``b.c``, ``c``), one dict
probe each, so its cost depends on the host's length, never on how many rules are loaded.

Rules come in tiers. The curated lists (and the allow list) are reviewed service by service; an
imported third-party list (UT1) is large and unreviewed, so it only decides a host no curated
rule covers: a curated match of any specificity beats an imported one. That way an ``allow``
for the company's own domain is never undone by a longer imported entry under it, and a row
names the curated rule when both lists know a host.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from .hosts import is_ip_literal, normalize_path

Action = Literal["block", "allow"]
Tier = Literal["curated", "ut1"]
# In order of precedence: a match in an earlier tier wins over any match in a later one.
TIERS: tuple[Tier, ...] = ("curated", "ut1")


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
    tier: Tier = "curated"


@dataclass(frozen=True)
class _Entry:
    rule: Rule
    exact: bool
    paths: tuple[str, ...]  # normalized prefixes; empty = every path
    precedence: int  # -TIERS.index(tier): higher wins, compared before specificity


@dataclass(frozen=True)
class Match:
    rule: Rule
    host_pattern: str
    path_prefix: str  # "" when the rule covers the whole host

    @property
    def specificity(self) -> tuple[int, int, int, int]:
        """Higher wins: tier first, then the longer host pattern, the longer path prefix, and
        on a tie allow over block."""
        return (
            -TIERS.index(self.rule.tier),
            len(self.host_pattern),
            len(self.path_prefix),
            self.rule.action == "allow",
        )


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
            precedence = -TIERS.index(rule.tier)
            for host in rule.hosts:
                # An IP literal has no subdomains: treat it as exact.
                entry = _Entry(rule, is_ip_literal(host), paths, precedence)
                index._by_host.setdefault(host, []).append(entry)
            for host in rule.exact_hosts:
                entry = _Entry(rule, True, paths, precedence)
                index._by_host.setdefault(host, []).append(entry)
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
        rules without path prefixes answer then. A curated rule beats an imported one; within
        a tier the longest host pattern wins, then the longest path prefix; on a tie an allow
        rule beats a block rule (``Match.specificity``).
        """
        # Compared as plain tuples (Match.specificity's order) and the Match made once: the
        # lookup runs for every name of every request.
        best: tuple[Rule, str, str] | None = None
        best_key: tuple[int, int, int, bool] | None = None
        norm_path = normalize_path(path) if path is not None else None
        for pattern, entry in self._candidates(host):
            prefix = ""
            if entry.paths:
                if norm_path is None:
                    continue
                found = next((p for p in entry.paths if norm_path.startswith(p)), None)
                if found is None:
                    continue
                prefix = found
            key = (entry.precedence, len(pattern), len(prefix), entry.rule.action == "allow")
            if best_key is None or key > best_key:
                best, best_key = (entry.rule, pattern, prefix), key
        return Match(*best) if best is not None else None

    def has_path_rules(self, host: str) -> bool:
        """Whether some rule for this host depends on the path (so a tunnel must be opened).

        A path rule of a lower tier than a rule covering the whole host can never win, so it
        does not count: an imported ``host/path`` entry under the company's allowed domain
        must not force interception of a tunnel that would pass anyway."""
        entries = [entry for _, entry in self._candidates(host)]
        whole = max((e.precedence for e in entries if not e.paths), default=None)
        return any(e.paths and (whole is None or e.precedence >= whole) for e in entries)
