"""The documentation: every ```python block of README.md, docs/getting-started.md and docs/guides/*.md runs, and
the site builds with ``mkdocs build --strict`` with the performance tables generated from bench/results.

A page's blocks run in order in one namespace (a later block may use an earlier one's names), on the CPU. Blocks
that cannot run by nature (shell commands, GPU-only code) are written as ```bash or ```text and are not run.
"""

from __future__ import annotations

import ast
import html
import importlib.util
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

import fused_ensemble

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "docs" / "getting-started.md", *sorted((ROOT / "docs" / "guides").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\n]*)$")

# What the examples may import from the package: the top-level public names, and these public modules.
PUBLIC_MODULES = {"fused_ensemble", "fused_ensemble.metrics", "fused_ensemble.data", "fused_ensemble.config",
                  "fused_ensemble.extension", "fused_ensemble.ops", "fused_ensemble.calibration",
                  "fused_ensemble.conformal", "fused_ensemble.ood",
                  "fused_ensemble.distributed"}
BENCHMARK_ZOO = "fused_ensemble.cli.models"  # allowed when an example shows the benchmark model zoo as such


def code_blocks(path: Path, language: str = "python") -> list[tuple[int, str]]:
    """The fenced blocks of ``language`` in a Markdown file, as (first line number, dedented source)."""
    blocks, lines = [], path.read_text().splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        is_language = opening["info"].strip().split(" ")[0] == language
        body, index = [], index + 1
        while index < len(lines):
            closing = FENCE.match(lines[index])
            if (closing is not None and closing["fence"][0] == fence[0] and len(closing["fence"]) >= len(fence)
                    and not closing["info"].strip()):
                break
            body.append(lines[index][indent:] if lines[index][:indent].strip() == "" else lines[index])
            index += 1
        if is_language:
            blocks.append((index - len(body) + 1, "\n".join(body) + "\n"))
        index += 1
    return blocks


def page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_block_extraction(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n```python\na = 1\n```\n\n- item\n\n  ```python\n  b = a + 1\n  ```\n"
                    "```bash\nls\n```\n````python\nc = '```'\n````\n")
    assert [source for _, source in code_blocks(page)] == ["a = 1\n", "b = a + 1\n", "c = '```'\n"]
    assert [line for line, _ in code_blocks(page)] == [3, 9, 15]


@pytest.mark.parametrize("path", PAGES, ids=page_id)
def test_examples_import_public_names_only(path):
    for line, source in code_blocks(path):
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fused_ensemble":
                where = f"{page_id(path)}:{line + node.lineno - 1}"
                assert node.module in PUBLIC_MODULES or node.module == BENCHMARK_ZOO, (
                    f"{where} imports from {node.module}, which is not a public module")
                for alias in node.names:
                    assert not alias.name.startswith("_"), f"{where} imports the private name {alias.name}"
                    if node.module == "fused_ensemble":
                        assert (alias.name in fused_ensemble.__all__
                                or f"fused_ensemble.{alias.name}" in PUBLIC_MODULES), (
                            f"{where} imports {alias.name}, which fused_ensemble does not export")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "fused_ensemble":
                        assert alias.name in PUBLIC_MODULES, f"{page_id(path)}:{line} imports {alias.name}"


@pytest.mark.parametrize("path", PAGES, ids=page_id)
def test_examples_run(path, tmp_path, monkeypatch):
    blocks = code_blocks(path)
    if not blocks:
        pytest.skip(f"{page_id(path)} has no python blocks")
    monkeypatch.chdir(tmp_path)  # an example that writes a file writes it here
    # The page runs as a module of its own, as a user's script would: classes it defines can be pickled.
    page = types.ModuleType("docs_example_" + re.sub(r"\W", "_", path.stem))
    monkeypatch.setitem(sys.modules, page.__name__, page)
    for line, source in blocks:
        # Line numbers in a traceback are the page's own.
        code = compile("\n" * (line - 1) + source, str(path), "exec")
        exec(code, page.__dict__)  # noqa: S102  (running the page's examples is the test)


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _numbers(value) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return []


def _report():
    spec = importlib.util.spec_from_file_location("docs_test_bench_report", ROOT / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    missing = [name for name in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers") if not _has(name)]
    if missing:
        pytest.skip(f"the documentation tools are not installed ({', '.join(missing)}): pip install -e '.[dev]'")
    site = tmp_path / "site"
    # mkdocstrings reads the package from the checkout (mkdocs.yml's paths); the hook imports bench/report.py.
    python_path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=python_path, NO_MKDOCS_2_WARNING="1")
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert build.returncode == 0, f"mkdocs build --strict failed:\n{build.stdout}\n{build.stderr}"

    page = (site / "performance" / "index.html").read_text()
    text = html.unescape(re.sub(r"<[^>]+>", " ", page))
    assert "report:" not in text, "a report placeholder was left in the performance page"
    sources = sorted(set(re.findall(r"bench/results/[\w.-]+/[\w.-]+\.json", text)))
    assert sources, "the performance page names no result file"
    report = _report()
    cells = set(re.findall(r"\d+\.\d+", text))  # the decimals in the page (a date or a count could match anything)
    for source in sources:
        with open(ROOT / source) as f:
            numbers = [n for n in _numbers(json.load(f)) if n not in (0, 1)]
        formatted = {report.fmt_ms(n) for n in numbers} | {report.fmt_fixed(n, 2) for n in numbers}
        assert {cell for cell in formatted if "." in cell} & cells, (
            f"no number of {source} appears in the built performance page")
