"""The layer picture of the README and docs/design.md is the one the imports draw, and orchestration stays short.

    python tests/test_layers.py      the ten longest functions of the package, longest first

Every module of the package belongs to one layer of the picture; a module may import modules of
its own layer and of the layers below, never of one above. The layers up to the trial import
neither Ray nor MLflow. No two modules import each other, directly or around a loop.
"""

import ast
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "erase"
PICTURE = re.compile(r"<!-- layers -->\n```text\n(.*?)```", re.S)
WITHOUT_RAY_OR_MLFLOW = ("base", "generators", "method", "runs")
ORCHESTRATION = ("cli", "sweep", "trial.py", "tracking.py", "registry.py", "data.py", "bench.py", "graph.py",
                 "config.py")
MAX_ORCHESTRATION_LINES = 60


def modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def picture(page: pathlib.Path) -> list[tuple[str, list[str]]]:
    """[(layer, [module paths])], top layer first, from the page's block after <!-- layers -->: a line per
    layer, its name first; its modules are the words ending in .py or / (an indented line adds more)."""
    match = PICTURE.search(page.read_text())
    assert match, f"{page.name} has no layer picture (a ```text block after <!-- layers -->)"
    layers = []
    for line in match.group(1).splitlines()[1:]:  # the first line names the columns
        paths = [word for word in line.split() if word.endswith((".py", "/"))]
        if line[:1].isspace():
            layers[-1][1].extend(paths)
        else:
            layers.append((line.split()[0], paths))
    return layers


def layer_of(layers, module: str) -> int:
    """The module's layer, counted from the bottom (0)."""
    for rank, (_, paths) in enumerate(reversed(layers)):
        for path in paths:
            name = "erase." + path.rstrip("/").removesuffix(".py").replace("/", ".") if path != "__init__.py" else "erase"
            if module == name or (path.endswith("/") and module.startswith(name + ".")):
                return rank
    raise AssertionError(f"module {module} is in no layer of the picture: add it to README.md and docs/design.md")


def imports(path: pathlib.Path, module: str) -> set[str]:
    """Every module `path` imports, at its top or inside functions; relative imports resolved."""
    names = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from erase import bench` is a module
    return names


def test_the_readme_and_the_design_page_draw_the_same_layers():
    assert picture(ROOT / "README.md") == picture(ROOT / "docs" / "design.md")


def test_no_module_imports_from_a_layer_above_its_own():
    layers, found = picture(ROOT / "docs" / "design.md"), modules()
    upward = []
    for module, path in found.items():
        rank = layer_of(layers, module)
        for name in imports(path, module):
            if name in found and name != "erase" and layer_of(layers, name) > rank:
                upward.append(f"{module} ({layers[-1 - rank][0]}) imports {name} ({layers[-1 - layer_of(layers, name)][0]})")
    assert not upward, "imports against the layer picture:\n" + "\n".join(upward)


def test_the_lower_layers_import_neither_ray_nor_mlflow():
    layers, found = picture(ROOT / "docs" / "design.md"), modules()
    lower = {rank for rank, (name, _) in enumerate(reversed(layers)) if name in WITHOUT_RAY_OR_MLFLOW}
    assert len(lower) == len(WITHOUT_RAY_OR_MLFLOW)
    bad = [f"{m} imports {n}" for m, p in found.items() if layer_of(layers, m) in lower
           for n in imports(p, m) if n.split(".")[0] in ("ray", "mlflow")]
    assert not bad, bad


def test_no_import_cycle_between_modules():
    found = modules()
    graph = {m: {n for n in imports(p, m) if n in found and n != m and n != "erase"} for m, p in found.items()}
    for package in [m for m in found if found[m].name == "__init__.py"]:  # a package's __init__ is its own business
        graph[package] = {n for n in graph[package] if not n.startswith(package + ".")}
    state: dict[str, str] = {}

    def visit(module, path):
        state[module] = "open"
        for name in sorted(graph[module]):
            if state.get(name) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(name):] + [name]))
            if name not in state:
                visit(name, path + [name])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def functions() -> list[tuple[int, str, str]]:
    """(lines, where, name) of every function and method of the package."""
    rows = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                rows.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(ROOT)}:{node.lineno}", node.name))
    return sorted(rows, reverse=True)


def test_orchestration_functions_stay_short():
    long = [f"{where} {name}: {lines} lines" for lines, where, name in functions() if lines > MAX_ORCHESTRATION_LINES
            and pathlib.Path(where.split(":")[0]).relative_to("erase").parts[0] in ORCHESTRATION]
    assert not long, f"orchestration functions over {MAX_ORCHESTRATION_LINES} lines:\n" + "\n".join(long)


if __name__ == "__main__":
    for lines, where, name in functions()[: int(sys.argv[1]) if len(sys.argv) > 1 else 10]:
        print(f"{lines:5d}  {where:40s} {name}")
