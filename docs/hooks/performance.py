"""MkDocs hook: the performance page's tables, generated from bench/results at build time.

A page may hold placeholders ``<!-- report:NAME -->`` on a line of their own; each is replaced by
``bench/report.py``'s ``sections()[NAME]`` (Markdown tables, each naming its result file, machine and date), so no
measured figure is typed by hand. An unknown NAME stops the build; a section that no result file feeds is logged as a
warning (an error under ``mkdocs build --strict``) and shown as a note.

The plots beside the result files (``bench/results/<machine>/*.png``) join the site as ``results/<machine>/*.png``,
so a page shows one by that path (``![...](../results/cpu-2core/NAME.png)`` from a guide) without a copy in docs/.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
REPORT = ROOT / "bench" / "report.py"
RESULTS = ROOT / "bench" / "results"
PLACEHOLDER = re.compile(r"^<!--\s*report:(?P<name>[\w-]+)\s*-->[ \t]*$", re.MULTILINE)

log = logging.getLogger("mkdocs.hooks.performance")
_sections: dict[str, str] | None = None


def _load_report():
    spec = importlib.util.spec_from_file_location("fused_ensemble_bench_report", REPORT)
    if spec is None or spec.loader is None:
        raise PluginError(f"cannot load the benchmark report generator {REPORT}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def on_pre_build(config, **kwargs) -> None:
    """Reads bench/results once per build (``mkdocs serve`` rebuilds re-read it)."""
    global _sections
    _sections = _load_report().sections()


def on_files(files, config, **kwargs):
    for plot in sorted(RESULTS.glob("*/*.png")):
        files.append(File.generated(config, f"results/{plot.parent.name}/{plot.name}", abs_src_path=str(plot)))
    return files


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    if "report:" not in markdown:
        return markdown
    sections = _sections if _sections is not None else _load_report().sections()

    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in sections:
            raise PluginError(f"{page.file.src_uri}: unknown report section {name!r}; bench/report.py has "
                              f"{', '.join(sorted(sections))}")
        text = sections[name].strip()
        if not text:
            log.warning("%s: no result file under bench/results feeds report section %r",
                        page.file.src_uri, name)
            return f'!!! note\n    No result file under `bench/results/` feeds the "{name}" tables yet.'
        return text

    return PLACEHOLDER.sub(replace, markdown)
