"""Layering rules and the engine bundle: who may import what, and what engines are shipped.

Imports are read from the source with ``ast`` (nothing is imported to check them), so a
module mid-edit elsewhere cannot break these tests by failing to import.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import cloudpickle
import pytest

from sshpar._bootstrap import ENGINE_MODULES, build_bundle

PKG = Path(__file__).resolve().parents[2] / "sshpar"
CLOUDPICKLE_DIR = Path(cloudpickle.__file__).resolve().parent
SUBPROCESS_TIMEOUT = 60


@dataclass(frozen=True)
class Import:
    module: str        # absolute dotted name, e.g. "sshpar.errors" or "asyncio"
    lineno: int
    lazy: bool         # inside a function body (runs only when called)
    type_checking: bool  # under `if TYPE_CHECKING:` (never runs)


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _sshpar_module_exists(dotted: str) -> bool:
    rel = Path(*dotted.split(".")[1:]) if dotted != "sshpar" else Path()
    return (PKG / rel).with_suffix(".py").is_file() or (PKG / rel / "__init__.py").is_file()


def imports_of(path: Path) -> list[Import]:
    """Every import statement in ``path``, resolved to absolute module names."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path)
    package = here if _is_package(path) else here.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool, tc: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(alias.name, node.lineno, lazy, tc))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from . import ops` imports the submodule sshpar._engine.ops; `from .x import Y`
            # imports sshpar.x (and Y is a name in it).
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if top(target) == "sshpar" and _sshpar_module_exists(sub):
                    found.append(Import(sub, node.lineno, lazy, tc))
                else:
                    found.append(Import(target, node.lineno, lazy, tc))
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for stmt in node.body:
                visit(stmt, lazy, True)
            for stmt in node.orelse:
                visit(stmt, lazy, tc)
            return
        inner_lazy = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                               ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner_lazy, tc)

    visit(tree, False, False)
    return found


def sshpar_files() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def top(name: str) -> str:
    return name.partition(".")[0]


def rel(path: Path) -> str:
    return path.relative_to(PKG.parent).as_posix()


# -- the modules engines run ------------------------------------------------------------------

def engine_module_names() -> set[str]:
    return {module_name(PKG / m) for m in ENGINE_MODULES}


# errors.RemoteError renders itself with rich through _render when *printed*, which only the
# client does; the import sits inside the methods, so engines never execute it.
CLIENT_ONLY_LAZY = {("sshpar.errors", "sshpar._render")}
# Used where the engine's Python has it, else done without (bulk frames are then signed with
# HMAC-SHA256): tried inside a function that catches the import's failure.
OPTIONAL_LAZY = {("sshpar._wire", "cryptography.hazmat.primitives.poly1305")}


@pytest.mark.parametrize("module", ENGINE_MODULES)
def test_engine_modules_import_only_stdlib_cloudpickle_and_other_engine_modules(
        module: str) -> None:
    path = PKG / module
    shipped = engine_module_names() | {"sshpar", "sshpar._engine"}
    here = module_name(path)
    wrong = []
    for imp in imports_of(path):
        if imp.type_checking:
            continue
        name = imp.module
        if top(name) in sys.stdlib_module_names or top(name) == "cloudpickle":
            continue
        if top(name) == "sshpar" and name in shipped:
            continue
        if imp.lazy and (here, name) in CLIENT_ONLY_LAZY | OPTIONAL_LAZY:
            continue
        wrong.append(f"{rel(path)}:{imp.lineno} imports {name}")
    assert not wrong, "engine modules must run with only the stdlib and the bundle:\n" + \
        "\n".join(wrong)


def test_every_engine_source_file_is_shipped() -> None:
    # _engine/__init__.py promises that everything under the package is shipped;
    # bundle_main.py travels as the bundle's __main__.py.
    engine_files = {f"_engine/{p.name}" for p in (PKG / "_engine").glob("*.py")}
    missing = engine_files - set(ENGINE_MODULES) - {"_engine/bundle_main.py"}
    assert not missing, f"engine modules missing from ENGINE_MODULES: {sorted(missing)}"


def test_cloudpickle_source_shipped_imports_only_stdlib() -> None:
    wrong = []
    for path in sorted(CLOUDPICKLE_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            for name in names:
                if top(name) not in sys.stdlib_module_names and top(name) != "cloudpickle":
                    wrong.append(f"{path.name}:{getattr(node, 'lineno', '?')} imports {name}")
    # Optional imports guarded by try/except would show here too; there are none today.
    assert not wrong, wrong


# -- the bundle -------------------------------------------------------------------------------

def expected_bundle_files() -> dict[str, bytes]:
    files = {
        "__main__.py": (PKG / "_engine" / "bundle_main.py").read_bytes(),
    }
    for m in ENGINE_MODULES:
        files[f"sshpar/{m}"] = (PKG / m).read_bytes()
    for p in CLOUDPICKLE_DIR.glob("*.py"):
        files[f"cloudpickle/{p.name}"] = p.read_bytes()
    return files


def test_bundle_holds_exactly_the_engine_modules_and_cloudpickle() -> None:
    bundle = build_bundle()
    with zipfile.ZipFile(io.BytesIO(bundle.data)) as zf:
        names = zf.namelist()
        contents = {n: zf.read(n) for n in names}
    expected = expected_bundle_files()
    modules = set(expected) | {"sshpar/__init__.py"}
    bytecode = {n + "c" for n in modules if n != "__main__.py"}
    assert sorted(names) == sorted(modules | bytecode)
    assert len(names) == len(set(names)), "duplicate entries"
    for name, data in expected.items():
        assert contents[name] == data, f"{name} differs from its source"
    # The package init is a stub: the real one imports the client side (asyncssh, rich...).
    init = ast.parse(contents["sshpar/__init__.py"])
    assert not [n for n in ast.walk(init) if isinstance(n, (ast.Import, ast.ImportFrom))]


def test_bundle_is_reproducible_and_named_by_its_hash(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # Two builds from scratch (no cached bundle), in this busy test process.
    monkeypatch.setenv("SSHPAR_HOME", str(tmp_path / "one"))
    first = build_bundle.__wrapped__()
    monkeypatch.setenv("SSHPAR_HOME", str(tmp_path / "two"))
    second = build_bundle.__wrapped__()
    assert (tmp_path / "two" / "cache").is_dir()  # and it was kept for the next client
    assert first.data == second.data
    assert first.digest == hashlib.sha256(first.data).hexdigest() == second.digest
    assert first.name == f"sshpar-{first.digest[:20]}.pyz"
    with zipfile.ZipFile(io.BytesIO(first.data)) as zf:
        infos = zf.infolist()
    assert [i.filename for i in infos] == sorted(i.filename for i in infos)
    assert {i.date_time for i in infos} == {(2020, 1, 1, 0, 0, 0)}


def test_bundle_is_the_same_built_by_another_process(tmp_path: Path) -> None:
    # A fresh interpreter with another hash seed, another cwd and fresh mtimes on nothing.
    code = "from sshpar._bootstrap import build_bundle; print(build_bundle().digest)"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "SSHPAR_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, check=True)
    assert out.stdout.strip() == build_bundle().digest


@pytest.fixture(scope="module")
def bundle_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bundle") / build_bundle().name
    path.write_bytes(build_bundle().data)
    return path


def run_bundle(bundle: Path, *args: str, flags: tuple[str, ...] = ("-I",),
               stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *flags, str(bundle), *args], input=stdin,
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, check=False)


def test_bundle_refuses_another_python_minor_version(bundle_file: Path) -> None:
    proc = run_bundle(bundle_file, "launch", "0.0")
    assert proc.returncode == 3, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("SSHPAR-ERROR "), proc.stdout
    doc = json.loads(lines[0][len("SSHPAR-ERROR "):])
    assert doc["kind"] == "version"
    assert doc["have"] == "{}.{}".format(*sys.version_info[:2])
    assert doc["executable"] == sys.executable
    assert sys.version.split()[0] in doc["message"]


@pytest.mark.parametrize("args, message", [((), "usage:"), (("bogus",), "unknown command")])
def test_bundle_with_a_wrong_command_says_so(bundle_file: Path, args: tuple[str, ...],
                                              message: str) -> None:
    proc = run_bundle(bundle_file, *args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert proc.stdout == ""


def test_bundle_imports_without_any_installed_package(bundle_file: Path) -> None:
    # -S: no site-packages at all, so sshpar and cloudpickle can come only from the bundle.
    code = (
        "import sys, json\n"
        f"sys.path.insert(0, {str(bundle_file)!r})\n"
        "import sshpar._engine.daemon, sshpar._engine.launcher, sshpar._engine.relay\n"
        "import sshpar._engine.ops, sshpar._engine.executor, sshpar._wire, sshpar._serialize\n"
        "import sshpar._markers, sshpar.errors, cloudpickle\n"
        "mods = {n: getattr(m, '__file__', None) for n, m in sys.modules.items()\n"
        "        if n.split('.')[0] in ('sshpar', 'cloudpickle')}\n"
        "print(json.dumps(mods))\n"
    )
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True,
                          text=True, timeout=SUBPROCESS_TIMEOUT, check=False)
    assert proc.returncode == 0, proc.stderr
    mods = json.loads(proc.stdout)
    assert "sshpar.client" not in mods and "sshpar._render" not in mods
    outside = {n: f for n, f in mods.items() if f and not f.startswith(str(bundle_file))}
    assert not outside, f"loaded from outside the bundle: {outside}"
    # from the bytecode shipped beside each module, not compiled at every start
    assert all(f.endswith(".pyc") for f in mods.values() if f), mods


# -- layering of the client side --------------------------------------------------------------

def test_transport_does_not_import_the_layers_above_it() -> None:
    above = {"sshpar", "sshpar.client", "sshpar.view", "sshpar.asyncresult", "sshpar._session",
             "sshpar._loop", "sshpar._bootstrap", "sshpar.cli"}
    allowed_sshpar = ("sshpar.config", "sshpar.errors", "sshpar._transport")
    wrong = []
    for path in sorted((PKG / "_transport").glob("*.py")):
        for imp in imports_of(path):
            upward = imp.module in above
            unknown = top(imp.module) == "sshpar" and not imp.module.startswith(allowed_sshpar)
            if upward or unknown:
                wrong.append(f"{rel(path)}:{imp.lineno} imports {imp.module}")
    assert not wrong, "\n".join(wrong)


def test_errors_imports_no_sshpar_module_except_render_lazily() -> None:
    wrong = []
    for imp in imports_of(PKG / "errors.py"):
        if top(imp.module) != "sshpar":
            continue
        if imp.lazy and imp.module == "sshpar._render":
            continue
        wrong.append(f"errors.py:{imp.lineno} imports {imp.module} (lazy={imp.lazy})")
    assert not wrong, "\n".join(wrong)


RICH_HOMES = ("sshpar/_render.py", "sshpar/cli.py")
#: Modules that may import rich inside a function only (so `import sshpar` never loads it).
RICH_LAZY_ONLY = ("sshpar/_progress.py",)  # AsyncResult.wait_interactive()'s progress bar


def cli_helpers() -> set[str]:
    """Files imported by sshpar/cli.py and by no other module: the command's own body."""
    importers: dict[str, set[str]] = {}
    for path in sshpar_files():
        for imp in imports_of(path):
            importers.setdefault(imp.module, set()).add(module_name(path))
    return {rel(path) for path in sshpar_files()
            if importers.get(module_name(path)) == {"sshpar.cli"}}


@pytest.mark.parametrize("library", ["asyncssh", "paramiko"])
def test_ssh_libraries_are_imported_only_under_transport(library: str) -> None:
    wrong = [f"{rel(path)}:{imp.lineno}"
             for path in sshpar_files() if not rel(path).startswith("sshpar/_transport/")
             for imp in imports_of(path) if top(imp.module) == library]
    assert not wrong, f"{library} imported outside sshpar/_transport/: {wrong}"


def test_rich_is_imported_only_by_render_and_the_cli() -> None:
    homes = set(RICH_HOMES) | cli_helpers()
    wrong = [f"{rel(path)}:{imp.lineno} (lazy={imp.lazy})"
             for path in sshpar_files() if rel(path) not in homes
             for imp in imports_of(path) if top(imp.module) == "rich"
             and not (imp.lazy and rel(path) in RICH_LAZY_ONLY)]
    assert not wrong, f"rich imported outside {sorted(homes)}: {wrong}"


def test_importing_sshpar_does_not_load_rich() -> None:
    code = "import sys, sshpar; print(sorted(m for m in sys.modules if m.startswith('rich')))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_module_level_imports_have_no_cycles() -> None:
    graph: dict[str, set[str]] = {}
    for path in sshpar_files():
        graph[module_name(path)] = {
            imp.module for imp in imports_of(path)
            if not imp.lazy and not imp.type_checking and top(imp.module) == "sshpar"
            and imp.module != module_name(path)
        }
    # The package __init__ re-exports everything, so it sits on top: a submodule importing a
    # name from `sshpar` itself closes a cycle and is reported.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                dfs(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            dfs(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_import_parser_sees_relative_lazy_and_type_checking_imports() -> None:
    # The rules above are only as good as the parser: check it on modules whose imports are
    # known.
    daemon = {i.module for i in imports_of(PKG / "_engine" / "daemon.py")}
    assert {"sshpar._wire", "sshpar.errors", "sshpar._engine.ops",
            "sshpar._engine.executor", "sshpar._engine.reactor", "threading"} <= daemon
    errors = [i for i in imports_of(PKG / "errors.py") if i.module == "sshpar._render"]
    assert errors and all(i.lazy for i in errors)
    sender = {i.module for i in imports_of(PKG / "_stream.py")}
    assert {"asyncio", "collections", "sshpar._wire"} <= sender
