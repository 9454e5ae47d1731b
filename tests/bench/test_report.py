"""The benchmark results' layout and provenance, and the Markdown tables bench/report.py makes from them."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
MACHINES = {"h100", "cpu-2core"}
ENVIRONMENT_KEYS = ("machine", "card", "torch", "commit", "command", "date")
WORK_ORGANIZATION = re.compile(r"\bsessions?\d*\b|\blease\b|lent gpu|issue #\d|this machine today", re.IGNORECASE)
SECTIONS = ("headline", "inference-h100", "reduction-h100", "training", "optimizer", "bench-cli-cpu", "calibration",
            "deployment-cpu", "scaling-out")


def _load_report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = _load_report()
RESULT_FILES = sorted(RESULTS.rglob("*.json"))


def _json(relative: str) -> dict:
    with open(RESULTS / relative) as f:
        return json.load(f)


def _tables(markdown: str) -> dict[str, list[dict]]:
    """Source file -> the rows (header -> cell) of the table after that file's "Source:" line."""
    found, source, header = {}, None, None
    for line in markdown.splitlines():
        match = re.match(r"Source: `([^`]+)`", line)
        if match:
            source, header = match[1], None
            found.setdefault(source, [])
        elif line.startswith("|") and source is not None:
            cells = [c.strip() for c in line.strip("|").split("|")]
            if header is None:
                header = cells
            elif not set(line) <= set("|-"):
                found[source].append(dict(zip(header, cells)))
    return found


def _row(rows: list[dict], **where) -> dict:
    matching = [r for r in rows if all(r.get(k) == str(v) for k, v in where.items())]
    assert len(matching) == 1, (where, matching)
    return matching[0]


def _assert_same(cell: str, value: float) -> None:
    """A table cell shows ``value`` rounded to the cell's digits."""
    number = re.match(r"[\d.]+", cell)[0]
    decimals = len(number.split(".")[1]) if "." in number else 0
    assert abs(float(number) - value) <= 0.5 * 10 ** -decimals + 1e-9, (cell, value)


@pytest.mark.parametrize("path", RESULT_FILES, ids=lambda p: str(p.relative_to(RESULTS)))
def test_result_file_names_its_machine_and_provenance(path):
    relative = path.relative_to(RESULTS)
    assert len(relative.parts) == 2 and relative.parts[0] in MACHINES, relative
    match = re.fullmatch(r"[a-z0-9]+(?:-[a-z0-9]+)*-(\d{4}-\d{2}-\d{2})\.json", relative.parts[1])
    assert match, relative
    with open(path) as f:
        environment = json.load(f)["environment"]
    for key in ENVIRONMENT_KEYS:
        assert key in environment, (relative, key)
    assert environment["machine"] == relative.parts[0]
    assert environment["date"] == match[1]
    assert environment["command"] and environment["card"]


def test_results_are_json_with_plots_beside_them():
    files = [p for p in RESULTS.rglob("*") if p.is_file()]
    assert RESULT_FILES
    for path in files:
        assert path.suffix in (".json", ".png"), path
        if path.suffix == ".png":
            assert path.with_suffix(".json").exists(), path


def test_no_work_organization_words_in_results_or_notes():
    for path in [p for p in RESULTS.rglob("*") if p.is_file()] + [ROOT / "bench" / "NOTES.md"]:
        assert not WORK_ORGANIZATION.search(str(path.relative_to(ROOT))), path
        text = path.read_bytes().decode("utf-8", errors="ignore")
        match = WORK_ORGANIZATION.search(text)
        assert match is None, (path, text[max(0, match.start() - 80):match.end() + 80] if match else None)


def test_every_section_has_content():
    built = report.sections()
    assert set(SECTIONS) <= set(built)
    for name, text in built.items():
        assert text.strip(), name
        assert "`bench/results/" in text, name  # every table names its files


def test_inference_cells_equal_the_json():
    tables = _tables(report.sections()["inference-h100"])
    path = "h100/ensemble-activations-freed-2026-11-27.json"
    point = next(p for p in _json(path)["points"] if p["members"] == 8 and p["batch"] == 1)
    row = _row(tables[f"bench/results/{path}"], model="resnet18-cifar", dtype="bfloat16", N=8, B=1)
    _assert_same(row["optimized (ms)"], point["ms"]["optimized"])
    _assert_same(row["loop + graph (ms)"], point["ms"]["loop_graph"])
    _assert_same(row["optimized vs best loop"], point["speedup_optimized_vs_best_loop"])


def test_reduction_cells_equal_the_json():
    tables = _tables(report.sections()["reduction-h100"])
    path = "h100/reduce-cuda-vs-triton-2026-11-27.json"
    result = next(r for r in _json(path)["results"]
                  if (r["N"], r["B"], r["K"], r["workload"]) == (4, 132, 32000, "stats"))
    row = _row(tables[f"bench/results/{path}"], N=4, B=132, K=32000, workload="stats")
    cell = row["CUDA C++ GB/s (of copy)"]
    _assert_same(cell, result["GB/s"]["cpp"])
    _assert_same(re.search(r"\(([\d.]+)\)", cell)[1], result["copy_fraction"]["cpp"])


def test_training_optimizer_and_bench_cli_cells_equal_the_json():
    built = report.sections()
    path = "cpu-2core/train-interleaved-2026-11-27.json"
    point = next(p for p in _json(path)["points"] if p["members"] == 8)
    row = _row(_tables(built["training"])[f"bench/results/{path}"], N=8)
    _assert_same(row["fused (ms)"], point["ms"]["fused"])

    path = "h100/optim-2026-11-27.json"
    entry = next(b for b in _json(path)["benchmarks"]
                 if b["name"] == "test_bench_optimizer_step[sgd-fused_ensemble_cuda_kernels]")
    row = _row(_tables(built["optimizer"])[f"bench/results/{path}"], group=entry["group"])
    _assert_same(row["fused_ensemble_cuda_kernels"], entry["stats"]["median"] * 1e3)

    path = "cpu-2core/bench-cli-settled-allocator-2026-11-27.json"
    row = _row(_tables(built["bench-cli-cpu"])[f"bench/results/{path}"], method="optimize(x)")
    _assert_same(row["ms"], _json(path)["results"]["optimized"]["ms"])


def test_calibration_cells_equal_the_json():
    path = "cpu-2core/digits-calibrated-2026-12-06.json"
    result = _json(path)
    text = report.sections()["calibration"]
    rows = _tables(text)[f"bench/results/{path}"]
    before, after = _row(rows, ensemble="before"), _row(rows, ensemble="after")
    _assert_same(after["temperature"], result["temperature"])
    for column, key in (("NLL", "nll"), ("Brier", "brier"), ("ECE", "ece")):
        _assert_same(before[column], result[f"ensemble_{key}"])
        _assert_same(after[column], result[f"ensemble_{key}_calibrated"])
    assert (f"coverage {result['conformal_coverage']:.4f}, mean set size {result['conformal_mean_set_size']:.2f} "
            f"classes") in text
    # The digits section names the held-out examples of a calibrated run.
    assert f"({result['calibration_examples']} of the training examples held out" in report.sections()["digits"]


def test_deployment_cells_equal_the_json():
    path = next(p.relative_to(RESULTS) for p in RESULT_FILES if p.name.startswith("deployment-"))
    tables = _tables(report.sections()["deployment-cpu"])
    point = next(p for p in _json(str(path))["points"] if p["model"] == "resnet18-cifar" and p["batch"] == 64)
    row = _row(tables[f"bench/results/{path}"], model="resnet18-cifar", N=8, B=64)
    _assert_same(row["ONNX Runtime (ms)"], point["ms"]["onnxruntime"])
    _assert_same(row["AOTInductor vs fused"], point["speedup_vs_fused"]["aoti"])
    _assert_same(row["member loop (ms)"], point["ms"]["loop"])


def test_scaling_out_cells_equal_the_json():
    path = "cpu-2core/sharded-2026-12-06.json"
    data = _json(path)
    rows = _tables(report.sections()["scaling-out"])[f"bench/results/{path}"]
    two = next(p for p in data["points"] if p["processes"] == 2)
    row = _row(rows, call="forward, `log_mean_probs`")
    counted = two["bytes_counted"]["forward_log_mean_probs"]
    assert row["collectives"] == "2"
    for cell, value in zip(row["2 processes"].split(" / "), (counted["payload_bytes"], counted["sent_bytes"])):
        number, unit = cell.split()
        _assert_same(number, value / {"B": 1, "kB": 1e3, "MB": 1e6}[unit])

    entry = next(e for e in data["bytes_versus_size"] if (e["members"], e["batch"], e["classes"]) == (64, 256, 1000))
    row = _row(rows, N=64, B=256, K=1000)
    _assert_same(row["sharded"].split()[0], entry["sharded_bytes"] / 1e6)
    _assert_same(row["ratio"], entry["ratio"])

    estimate = next(e for e in data["estimate_8_gpus"] if e["fabric"].startswith("8x H100 SXM")
                    and e["classes"] == 1000)
    row = _row(rows, workload=estimate["workload"], GPUs=estimate["fabric"])
    _assert_same(row["forward, gathering logits (ms)"], estimate["forward_gather_logits_ms"])
    _assert_same(row["step, data parallel (ms)"], estimate["train_step_data_parallel_ms"])
    assert "https://github.com/NVIDIA/nccl-tests" in report.sections()["scaling-out"]


def test_scaling_out_times_and_speedups_of_a_timed_file(tmp_path):
    (tmp_path / "cpu-2core").mkdir()
    points = [{"processes": 1, "group": False, "threads": 1, "member_blocks": [8], "forward_ms": 4.0,
               "train_step_ms": 10.0},
              {"processes": 2, "group": True, "threads": 1, "member_blocks": [4, 4], "forward_ms": 2.5,
               "train_step_ms": 5.0, "bytes_counted": {"forward_vote": {"payload_bytes": 2560, "sent_bytes": 2560.0,
                                                                        "collectives": 1}}}]
    with open(tmp_path / "cpu-2core" / "sharded-2026-01-02.json", "w") as f:
        json.dump({"config": {"members": 8}, "points": points}, f)
    rows = _tables(report.sections(tmp_path)["scaling-out"])["bench/results/cpu-2core/sharded-2026-01-02.json"]
    alone = _row(rows, run="1 process, no group, 1 thread")
    assert alone["forward (ms)"] == "4.00" and alone["forward speedup"] == "1.00x"
    group = _row(rows, run="2 processes in a gloo group, 1 thread each")
    assert group["members per rank"] == "4 + 4" and group["forward speedup"] == "1.60x"
    assert group["step speedup"] == "2.00x"
    assert _row(rows, call="forward, `vote`")["2 processes"] == "2.56 kB / 2.56 kB"
    assert _row(rows, call="`stats()`")["2 processes"] == "- / - (formula)"  # missing keys show as dashes


def test_headline_names_machine_date_and_source():
    rows = [line for line in report.sections()["headline"].splitlines() if line.startswith("| ")][1:]
    assert 3 <= len(rows) <= 6
    for line in rows:
        assert re.search(r"`(h100|cpu-2core)`", line) and re.search(r"\d{4}-\d{2}-\d{2}", line)
        assert "`bench/results/" in line


def test_missing_keys_show_as_dashes(tmp_path):
    (tmp_path / "h100").mkdir()
    point = {"model": "mlp", "dtype": "float32", "members": 2, "batch": 4, "ms": {"loop": 1.5, "optimized": 1.0}}
    with open(tmp_path / "h100" / "ensemble-sparse-2026-01-02.json", "w") as f:
        json.dump({"points": [point]}, f)
    built = report.sections(tmp_path)
    text = built["inference-h100"]
    assert "commit `-`" in text
    row = _tables(text)["bench/results/h100/ensemble-sparse-2026-01-02.json"][0]
    assert row["loop (ms)"] == "1.50" and row["efficiency"] == "-" and row["chosen"] == "-"
    assert built["training"] == ""


def test_command_line_prints_one_section_or_all(capsys):
    assert report.main(["--section", "optimizer"]) == 0
    one = capsys.readouterr().out
    assert one.strip() == report.sections()["optimizer"].strip()
    assert report.main(["--all"]) == 0
    every = capsys.readouterr().out
    assert one.strip() in every and "## headline" in every


def test_the_readme_tables_are_the_generated_ones():
    readme = (ROOT / "README.md").read_text()
    assert report.FILLED_BLOCK.search(readme), "README.md has no generated block"
    assert report.fill(readme, report.sections()) == readme, "run: python bench/report.py --fill README.md"
