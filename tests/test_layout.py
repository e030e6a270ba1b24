"""The import rules of the layout (README, "Layout"): which package may import which.

- Nothing in ``service/`` imports torch, ``training`` or ``models`` (checked by importing every
  module in a fresh interpreter).
- ``training/`` imports nothing of ``service/`` but ``service.bundle``.
- ``models/`` holds PyTorch modules only: no I/O (no files, checkpoints, images or export).
- Inside ``service/`` each package imports only the ones below it, so there are no circles.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# package -> the project packages it may import (besides itself). ``service.cli`` imports lazily
# whatever a subcommand needs, training included.
ALLOWED = {
    "service.bundle": set(),
    "service.runtime": {"service.bundle"},
    "service.engine": {"service.bundle", "service.runtime"},
    "service.api": {"service.bundle", "service.runtime", "service.engine"},
    "service.client": {"service.bundle"},
    "service.jobs": {"service.bundle", "service.runtime", "service.client"},
    "training": {"models", "service.bundle", "training"},
    "models": set(),
}
PROJECT = ("service", "training", "models")


def _modules(package: str) -> list[Path]:
    base = ROOT / package.replace(".", "/")
    return sorted(base.rglob("*.py")) if base.is_dir() else [base.with_suffix(".py")]


def _imports(path: Path) -> set[str]:
    """Every project module a file imports, at any depth (lazy imports inside functions count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {m for m in found if m.split(".")[0] in PROJECT}


def _owner(module: str) -> str:
    for package in sorted(ALLOWED, key=len, reverse=True):
        if module == package or module.startswith(package + "."):
            return package
    return module


def test_packages_import_only_what_the_layout_allows():
    problems = []
    for package, allowed in ALLOWED.items():
        for path in _modules(package):
            for module in _imports(path):
                target = _owner(module)
                if target != package and target not in allowed:
                    problems.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not problems, "\n".join(problems)


def _third_party(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_the_engine_speaks_no_http_and_the_api_holds_only_http():
    """``service/engine/`` (batching, the workers layout) imports neither ``service.api`` nor any web
    framework; ``service/api/`` stays small: HTTP only."""
    web = {"fastapi", "starlette", "uvicorn", "httpx", "pydantic", "pydantic_settings", "python_multipart"}
    problems = [f"{p.relative_to(ROOT)} imports {m}" for p in _modules("service.engine")
                for m in _third_party(p) & web]
    problems += [f"{p.relative_to(ROOT)} imports {m}" for p in _modules("service.engine")
                 for m in _imports(p) if m.startswith("service.api")]
    assert not problems, problems
    lines = sum(len(p.read_text().splitlines()) for p in _modules("service.api"))
    assert lines < 2000, f"service/api/ has {lines} lines"


def test_both_engines_implement_the_one_protocol():
    """The router calls ``InferenceEngine`` only; the in-process and the remote engine both implement it
    with the same signatures (no attribute probing)."""
    import inspect

    from service.engine.engine import Engine
    from service.engine.protocol import InferenceEngine
    from service.engine.remote import RemoteEngine

    members = [n for n in vars(InferenceEngine) if not n.startswith("_")] + list(InferenceEngine.__annotations__)
    for cls in (Engine, RemoteEngine):
        for name in members:
            assert hasattr(cls, name) or name in inspect.signature(cls.__init__).parameters or \
                name in _assigned_in_init(cls), (cls.__name__, name)
            proto = getattr(InferenceEngine, name, None)
            if callable(proto) and not isinstance(proto, property):
                want = list(inspect.signature(proto).parameters)
                assert list(inspect.signature(getattr(cls, name)).parameters) == want, (cls.__name__, name)


def _assigned_in_init(cls) -> set[str]:
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls.__init__)))
    return {t.attr for n in ast.walk(tree) if isinstance(n, ast.Assign) for t in n.targets
            if isinstance(t, ast.Attribute)}


def test_one_intake_decides_which_images_are_refused():
    """Pillow's open/decode errors are caught in ``service/bundle/intake.py`` only: no other module keeps
    its own list of image exception types (they drifted apart before)."""
    pillow_errors = ("UnidentifiedImageError", "DecompressionBombError")
    offenders = [p.relative_to(ROOT).as_posix() for p in _modules("service")
                 if any(e in p.read_text() for e in pillow_errors)]
    assert offenders == ["service/bundle/intake.py"], offenders


def test_training_imports_only_the_bundle_contract_of_the_service():
    imported = {m for path in _modules("training") for m in _imports(path) if m.startswith("service")}
    assert imported, "training should use the bundle contract"
    assert all(m == "service.bundle" or m.startswith("service.bundle.") for m in imported), imported


# What a module of ``models/`` may import: torch and a few pure-computation standard modules.
MODELS_MAY_IMPORT = {"__future__", "collections", "contextlib", "dataclasses", "functools", "math", "typing",
                     "torch", "models"}
# Calls that read or write something outside the process.
IO_CALLS = {"open", "save", "load", "export", "read_text", "write_text", "read_bytes", "write_bytes"}


def test_models_hold_modules_only_without_io():
    problems = []
    for path in _modules("models"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                if name.split(".")[0] not in MODELS_MAY_IMPORT or name.startswith("torch.onnx"):
                    problems.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
            if isinstance(node, ast.Call):
                func = node.func
                called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                if called in IO_CALLS:
                    problems.append(f"{path.relative_to(ROOT)}:{node.lineno} calls {called}")
    assert not problems, "\n".join(problems)


def test_cached_sampling_lives_where_the_layout_says():
    """``CachedPrior`` (a module) in ``models/``; its ONNX step graphs exported by ``training/export_steps.py``."""
    defined = {path.relative_to(ROOT).as_posix(): {n.name for n in ast.walk(ast.parse(path.read_text()))
                                                   if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
               for package in ("models", "training") for path in _modules(package)}
    assert [f for f, names in defined.items() if "CachedPrior" in names] == ["models/cached_prior.py"]
    assert [f for f, names in defined.items() if "export_step_graphs" in names] == ["training/export_steps.py"]


def test_the_command_line_only_wires_subcommands():
    """``service/cli.py`` parses; each subcommand's work lives in its package (``vqtok sample`` in
    ``service/jobs/sample.py``, ``vqtok tokenize`` in ``service/jobs/tokenize.py``, ...)."""
    tree = ast.parse((ROOT / "service" / "cli.py").read_text())
    handlers = [f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name not in ("build_parser", "main")]
    assert handlers
    long = [f"{f.name}: {len(f.body)} statements" for f in handlers if len(f.body) > 4]  # import, call, print
    assert not long, long
    assert (ROOT / "service" / "jobs" / "sample.py").is_file()


def test_service_modules_import_without_torch_training_or_models():
    modules = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                     for p in (ROOT / "service").rglob("*.py"))
    assert len(modules) > 20
    script = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'training', 'models'))\n"
        "print('BAD', bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("BAD []"), out.stdout


def test_level_names_are_not_spelled_out_in_the_service():
    """Level names come from the manifest: no "top"/"bottom" string literals in service code."""
    offenders = []
    for path in (ROOT / "service").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in ("top", "bottom"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders


def test_dockerfile_copies_only_what_the_server_needs():
    import re

    text = (ROOT / "Dockerfile").read_text()
    copied = {src for line in re.findall(r"^COPY (.+)$", text, re.MULTILINE) for src in line.split()[:-1]}
    assert "service" in copied and "artifacts/default" in copied
    assert not copied & {"models", "training", "tests", "bench"}, copied


def test_no_import_circles():
    """No module imports (even lazily) a module that imports it back, directly or around a loop."""
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for package in PROJECT for p in (ROOT / package).rglob("*.py")}
    graph = {}
    for module, path in files.items():
        targets = set()
        for imported in _imports(path):
            # "from service.bundle import Bundle" is an arrow to the package's __init__ (a module of its own)
            while imported and imported not in files:
                imported = imported.rpartition(".")[0]
            if imported and imported != module:
                targets.add(imported)
        graph[module] = targets
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    # A package __init__ re-exporting its submodules is not a circle of logic.
    cycles = [c for c in cycles if not any(m.endswith(("service.bundle", "models")) and
                                           graph.get(m) and set(c) <= {m, *graph[m]} for m in c)]
    assert not cycles, cycles
