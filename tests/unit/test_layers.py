"""The package's layers import downwards only: cli → runtime → console → requestlog → core,
with ``metrics`` a leaf every layer may count into. ``core`` imports nothing from mitmproxy."""

import ast

import pytest

from support import REPO

PACKAGE = REPO / "addons" / "egress_guard"
RANK = {
    "notify": -1,  # below core: the policy loader reads its spec; it imports no layer
    "core": 0,
    "metrics": 0,
    "requestlog": 1,
    "console": 2,
    "runtime": 3,
    "cli": 4,
}


def layer_of(module: str) -> str:
    """``egress_guard.runtime.adapters.audit`` → ``runtime``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def module_name(path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def imports_of(source: str, module: str) -> list[str]:
    """Absolute names of the modules that ``source`` (the module ``module``) imports."""
    package = module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                if node.module:
                    found.append(".".join([*base, node.module]))
                else:
                    found += [".".join([*base, a.name]) for a in node.names]
            elif node.module:
                found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names]
    return found


def upward_imports(source: str, module: str) -> list[str]:
    own = layer_of(module)
    if own not in RANK:
        return []
    return [
        m
        for m in imports_of(source, module)
        if m.startswith("egress_guard.")
        and layer_of(m) in RANK
        and layer_of(m) != own
        and RANK[layer_of(m)] >= RANK[own]
    ]


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_downwards(path):
    wrong = upward_imports(path.read_text(encoding="utf-8"), module_name(path))
    assert not wrong, f"{path.name} imports upwards or sideways: {wrong}"


@pytest.mark.parametrize("path", sorted((PACKAGE / "core").glob("*.py")), ids=lambda p: p.name)
def test_core_knows_nothing_of_mitmproxy(path):
    imported = imports_of(path.read_text(encoding="utf-8"), module_name(path))
    assert not [m for m in imported if m.split(".")[0] == "mitmproxy"]


def test_the_layer_checker_sees_a_violation():
    """The check above can fail: a core module importing upwards is caught, relative imports
    included, and a runtime module importing core is not."""
    source = (
        "from ..runtime import flows\nfrom egress_guard.console import app\nfrom . import hosts\n"
    )
    assert upward_imports(source, "egress_guard.core.probe") == [
        "egress_guard.runtime",
        "egress_guard.console",
    ]
    assert upward_imports("from ..core import hosts\n", "egress_guard.runtime.probe") == []
