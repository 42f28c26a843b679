"""The house (docs/contributing.md): each room (a subpackage of glmc_ray, or a command-line module) imports only
from rooms on lower floors, and no modules import each other in a circle."""
import ast

from tests.conftest import REPO

# lowest first; a module imports from its own room and from rooms on lower floors, never from a room beside it
FLOORS = [("core", "models"), ("methods",), ("data", "runs"), ("training",), ("distributed",), ("search",),
          ("train", "shards", "compare")]
FLOOR = {room: level for level, rooms in enumerate(FLOORS) for room in rooms}
PACKAGE = REPO / "glmc_ray"


def _module_name(path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path) -> set[str]:
    """The glmc_ray modules `path` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("glmc_ray"):
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("glmc_ray")}
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for target in _imports(path):
            while target not in modules:  # `from glmc_ray.core import config` names a module; a name, its module
                target = target.rsplit(".", 1)[0]
            if target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def _room(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def test_every_module_lives_in_a_room_of_the_house():
    rooms = {_room(m) for m in _graph()} - {"glmc_ray"}
    assert rooms == set(FLOOR), "a new room: give it a floor here and in docs/contributing.md"


def test_imports_go_down_the_floors():
    upward = [f"{module} (floor {FLOOR[_room(module)]}) imports {target} (floor {FLOOR[_room(target)]})"
              for module, targets in _graph().items() if module != "glmc_ray"
              for target in sorted(targets) if target != "glmc_ray" and _room(target) != _room(module)
              and FLOOR[_room(target)] >= FLOOR[_room(module)]]
    assert not upward, "only lower floors: " + "; ".join(upward)


def test_no_modules_import_each_other_in_a_circle():
    graph, done, path = _graph(), set(), []

    def visit(module):
        if module in path:
            raise AssertionError(f"import circle: {' -> '.join(path[path.index(module):] + [module])}")
        if module in done:
            return
        path.append(module)
        for target in sorted(graph[module]):
            visit(target)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
