"""pytest-benchmark suites of bench/: they import the workloads of their sibling scripts (the project's pytest
options use importlib mode, which does not put a test's folder on sys.path), and every JSON they write
(``--benchmark-json``) records its environment as the other result files do (machine, card, versions, commit,
command, date)."""

import os
import sys

import torch

from fused_ensemble.cli.environment import environment_info

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["environment"] = environment_info("cuda" if torch.cuda.is_available() else "cpu")
