"""The rules the code base keeps, checked on its source: the package's import graph has no circle and points down
(the library never imports its command line), no module reaches into another module's underscored names, the
environment is read in one place, ruff is clean, and the text speaks of the project only."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fused_ensemble"
WORK_ORGANIZATION = re.compile(r"\bsessions?\b|\blease[sd]?\b|lent gpu|a lent\b|issue #\d|issue's|this machine today",
                               re.IGNORECASE)
# pytest's fixture scopes and ONNX Runtime's API (classes, options, config keys) say "session" about themselves.
ALLOWED_SESSION_WORDS = re.compile(r"scope=.session.|pytest-of|sessionstart|InferenceSession|session_options|"
                                   r"SessionOptions|add_session_config_entry|session\.intra_op|ort\.", re.IGNORECASE)


def _module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, imported names) for every import statement of a module, relative ones resolved."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.append((base, [alias.name for alias in node.names]))
    return found


def _internal_edges() -> dict[str, set[str]]:
    """Module -> the package modules it imports (a submodule imported by name counts as that module)."""
    edges = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for module, names in _imports(name, path):
            for target in [module] + [f"{module}.{imported}" for imported in names]:
                while target and target not in MODULES:
                    target = target.rpartition(".")[0]
                if target and target != name and target != "fused_ensemble":
                    edges[name].add(target)
    return edges


def test_the_package_has_no_import_circle():
    edges = _internal_edges()
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(edges[name]):
            if state.get(target) == "open":
                cycle = path[path.index(target):] + [target]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[name] = "done"

    for name in MODULES:
        if name not in state:
            visit(name, [name])


def test_the_library_never_imports_the_command_line_or_the_benchmarks():
    for name, path in MODULES.items():
        if name.startswith("fused_ensemble.cli") or name == "fused_ensemble.__main__":
            continue
        for module, _ in _imports(name, path):
            assert not module.startswith("fused_ensemble.cli"), f"{name} imports {module}"
            assert module.split(".")[0] not in ("bench", "tests"), f"{name} imports {module}"


def test_no_module_imports_another_modules_underscored_names():
    for name, path in MODULES.items():
        for module, names in _imports(name, path):
            if not module.startswith("fused_ensemble"):
                continue
            private = [part for part in module.split(".") if part.startswith("_") and part != "__init__"]
            private += [imported for imported in names if imported.startswith("_")]
            assert not private, f"{name} imports {private} from {module}"


def test_the_environment_is_read_in_the_config_module_only():
    # The build helper sets CUDA_HOME for the C++ build (setup.py loads it by path); it configures nothing.
    allowed = {"fused_ensemble.config", "fused_ensemble.build_support"}
    for name, path in MODULES.items():
        if name in allowed:
            continue
        source = path.read_text()
        assert not re.search(r"os\.environ|os\.getenv|getenv\(", source), f"{name} reads the environment"


def test_ruff_is_clean():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)], capture_output=True,
                          text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def _tracked_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    return [ROOT / line for line in listed.stdout.splitlines() if (ROOT / line).is_file()]


def test_the_repository_speaks_of_the_project_only():
    offending = []
    for path in _tracked_files():
        relative = str(path.relative_to(ROOT))
        # The checks themselves name the words they look for.
        if path.suffix in (".png", ".so") or relative in ("tests/test_repository.py", "tests/bench/test_report.py"):
            continue
        if WORK_ORGANIZATION.search(relative):
            offending.append(relative)
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
            if WORK_ORGANIZATION.search(ALLOWED_SESSION_WORDS.sub("", line)):
                offending.append(f"{relative}:{number}: {line.strip()[:100]}")
    assert not offending, "text about how the work was organized:\n" + "\n".join(offending)


def test_the_readme_is_a_newcomers_page():
    words = len((ROOT / "README.md").read_text().split())
    assert words <= 1500, f"README.md has {words} words"
