"""The layering DESIGN.md draws: the core library imports no RPC layer and no service package,
and its modules import each other without cycles."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "latentedit"
SERVICES = ("generator_svc", "scorer_svc", "trainer_svc", "editor_svc")
# The RPC layer and the command line sit on top of the core; the generated stubs are wire types.
NOT_CORE = ("rpc", "cli.py", "__main__.py", "api")


def _core_modules():
    for path in sorted(CORE.rglob("*.py")):
        relative = path.relative_to(CORE)
        if relative.parts[0] in NOT_CORE:
            continue
        name = ".".join(("latentedit", *relative.with_suffix("").parts)).removesuffix(".__init__")
        yield name, path


def _imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_the_core_imports_no_rpc_layer_or_service():
    offenders = {}
    for name, path in _core_modules():
        bad = {m for m in _imports(path, top_level_only=False)
               if m.startswith(("latentedit.rpc", "grpc_health", "grpc_reflection", *SERVICES))}
        if bad:
            offenders[name] = sorted(bad)
    assert not offenders, offenders


def test_core_modules_import_each_other_without_cycles():
    modules = dict(_core_modules())
    graph = {name: {m for m in _imports(path, top_level_only=False) if m in modules and m != name} for name, path in modules.items()}
    state: dict[str, int] = {}

    def visit(node, trail):
        if state.get(node) == 1:
            raise AssertionError(f"import cycle: {' -> '.join([*trail, node])}")
        if state.get(node) == 2:
            return
        state[node] = 1
        for target in graph[node]:
            visit(target, [*trail, node])
        state[node] = 2

    for module in graph:
        visit(module, [])
