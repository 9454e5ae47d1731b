"""The benchmark scripts of bench/ run end to end on tiny workloads (ensemble throughput, the reduction benchmark in
its CPU smoke mode, training throughput and the training-step profile). Timings are not checked (they live in
bench/); the outputs' structure and the correctness checks the scripts do themselves are."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

BENCH = pathlib.Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def bench_scripts(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))


def test_ensemble_throughput_smoke(tmp_path, bench_scripts):
    import ensemble_throughput

    path = tmp_path / "throughput.json"
    assert ensemble_throughput.main(["--preset", "smoke", "--device", "cpu", "--reps", "1", "--json", str(path),
                                     "--compile-vmap", "--optimize-compile"]) == 0
    points = json.loads(path.read_text())["points"]
    assert [(p["model"], p["members"], p["batch"]) for p in points] == [("lenet", 2, 4), ("mlp", 3, 4)]
    for point in points:
        assert "error" not in point, point.get("error")
        assert {"loop", "vmap", "vmap_compile", "fused", "optimized", "optimized_compile",
                "single_member_NxB"} <= set(point["ms"])
        assert max(point["relative_error_vs_loop"].values()) < 1e-4
        assert point["flops_per_forward"] > 0 and point["ensemble_efficiency"] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reduce_benchmark_smoke(tmp_path, bench_scripts, dtype):
    import reduce_gpu

    report = reduce_gpu.run(str(tmp_path / "reduce.json"), smoke=True, dtype=dtype)
    assert report["device"] == "cpu" and report["copy_GB/s"] > 0
    assert report["dtype"] == str(dtype).replace("torch.", "")
    rows = report["results"]
    assert {row["workload"] for row in rows} == {"mean", "mean_probs", "softmax_of_mean", "log_mean_probs", "stats"}
    for row in rows:
        assert row["ms"]["eager"] > 0 and "triton" in row["skipped"]
        # every implementation that ran was checked against eager by the tool itself
        assert set(row["max_abs_error_vs_eager"]) == set(row["ms"])


def test_interleaved_times_take_turns_and_count_every_call():
    from fused_ensemble.inference.timing import interleaved_times

    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = interleaved_times(fns, "cpu", min_reps=7, budget_ms=0.0, rounds=3)
    assert {name: len(ms) for name, ms in times.items()} == {"a": 7, "b": 7}
    timed = calls[4:]  # each function's sizing call runs after one warm-up call
    assert calls[:4] == ["a", "a", "b", "b"]
    assert timed == ["a"] * 2 + ["b"] * 2 + ["a"] * 2 + ["b"] * 2 + ["a"] * 3 + ["b"] * 3



def test_profile_train_step_accounts_for_the_step(tmp_path, bench_scripts):
    import profile_train_step

    path = tmp_path / "profile.json"
    assert profile_train_step.main(["--members", "2", "--batch", "2", "--steps", "1", "--device", "cpu",
                                    "--model", "lenet", "--implementations", "loop,fused", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert set(result["implementations"]) == {"loop", "fused"}
    for row in result["implementations"].values():
        assert row["wall_ms_per_step"] > 0 and row["operators"]
        assert row["kinds_ms_per_step"]["conv forward"] > 0 and row["kinds_ms_per_step"]["optimizer"] > 0
        assert abs(sum(row["kinds_ms_per_step"].values()) - row["profiled_ms_per_step"]) < 1e-6
        by_shape = row["convolutions_by_shape"]
        conv_ms = row["kinds_ms_per_step"]["conv forward"] + row["kinds_ms_per_step"]["conv backward"]
        assert any(r["name"] == "aten::convolution_backward" and len(r["input_shapes"]) == 3 for r in by_shape)
        assert abs(sum(r["self_ms_per_step"] for r in by_shape) - conv_ms) < 1e-3 * conv_ms
    assert profile_train_step.kind_of("aten::convolution_backward") == "conv backward"
    assert profile_train_step.kind_of("autograd::engine::evaluate_function: ConvolutionBackward0") == "conv backward"
    assert profile_train_step.kind_of("fused_ensemble_ext::member_sgd_") == "optimizer"


def test_train_throughput_times_the_three_steps_in_turns(tmp_path, bench_scripts):
    import train_throughput

    path = tmp_path / "train.json"
    assert train_throughput.main(["--members", "2", "--batch", "1", "--device", "cpu", "--rounds", "2", "--reps", "2",
                                  "--channels-last", "--bf16-autocast", "--json", str(path)]) == 0
    points = json.loads(path.read_text())["points"]
    assert [(point["memory_format"], point["precision"]) for point in points] == [
        ("contiguous_format", "float32"), ("contiguous_format", "bf16 autocast"),
        ("channels_last", "float32"), ("channels_last", "bf16 autocast")]
    for point in points:
        assert set(point["ms"]) == {"loop", "vmap", "fused"}
        assert all(len(times) == 2 for times in point["times_ms"].values())
        assert point["fused_vs_loop"] == pytest.approx(point["ms"]["loop"] / point["ms"]["fused"])


def test_train_throughput_vmap_baseline_runs_members_with_dropout(bench_scripts):
    # vmap's default randomness="error" refused the MLP's dropout: the baseline was missing for such models.
    import train_throughput

    point = train_throughput.measure(2, 4, "cpu", rounds=1, min_reps=1, model="mlp")
    assert set(point["ms"]) == {"loop", "vmap", "fused"} and not point["unsupported"]


@pytest.mark.slow
def test_train_throughput_times_chosen_points_and_the_fused_step_variants(tmp_path, bench_scripts):
    import train_throughput

    path = tmp_path / "train.json"
    assert train_throughput.main(["--members", "2", "--batch", "2", "--device", "cpu", "--rounds", "2", "--reps", "2",
                                  "--model", "lenet", "--formats", "channels_last", "--precisions", "float32",
                                  "--implementations", "loop,fused,fused_compile,fused_member_backward", "--json",
                                  str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["model"] == "lenet"
    (point,) = result["points"]
    assert (point["memory_format"], point["precision"]) == ("channels_last", "float32")
    assert set(point["ms"]) == {"loop", "fused", "fused_compile", "fused_member_backward"}
    assert not point["unsupported"]
    for ours in ("fused_compile", "fused_member_backward"):
        assert point[f"{ours}_vs_loop"] == pytest.approx(point["ms"]["loop"] / point["ms"][ours])
    assert point["fused_vs_vmap"] is None


def test_train_throughput_records_an_implementation_that_cannot_run_a_point(tmp_path, bench_scripts, monkeypatch):
    # As torch.vmap of cuDNN BatchNorm on NHWC inputs does on CUDA: that point goes on without it.
    import train_throughput

    def vmap_that_raises(members):
        def step(x, y):
            raise RuntimeError("NYI: querying is_contiguous inside of vmap\nsecond line")
        return step

    monkeypatch.setitem(train_throughput.BUILDERS, "vmap", vmap_that_raises)
    point = train_throughput.measure(2, 1, "cpu", rounds=1, min_reps=1)
    assert set(point["ms"]) == {"loop", "fused"}
    assert point["unsupported"] == {"vmap": "RuntimeError: NYI: querying is_contiguous inside of vmap"}
    assert point["fused_vs_vmap"] is None
    assert point["fused_vs_loop"] == pytest.approx(point["ms"]["loop"] / point["ms"]["fused"])


def test_stats_check_tells_ties_from_wrong_rows(bench_scripts):
    import reduce_workloads as rw

    logits = torch.randn(4, 6, 5)
    # Row 2: members 0 and 1 pick class 0, members 2 and 3 class 1, with mirrored logits: the two classes' mean
    # probabilities tie, and either prediction has half the members against it.
    logits[:2, 2] = torch.tensor([3.0, 1.0, 0.0, 0.0, 0.0])
    logits[2:, 2] = torch.tensor([1.0, 3.0, 0.0, 0.0, 0.0])
    expected = rw.reference("stats")(logits)
    assert rw.check_against_eager("stats", rw.kernel("stats", "torch")(logits), expected) < 1e-6

    tie_flipped = list(expected)
    tie_flipped[5] = expected.prediction.clone()
    tie_flipped[5][2] = 1 - expected.prediction[2]
    tie_flipped[6] = expected.disagreement.clone()
    tie_flipped[6][2] = 0.75  # whatever a flipped tie does to the count, it is not compared
    rw.check_against_eager("stats", tuple(tie_flipped), expected)

    wrong_prediction = list(expected)
    wrong_prediction[5] = expected.prediction.clone()
    wrong_prediction[5][0] = (expected.prediction[0] + 1) % 5
    with pytest.raises(AssertionError, match="not by ties"):
        rw.check_against_eager("stats", tuple(wrong_prediction), expected)

    wrong_disagreement = list(expected)
    wrong_disagreement[6] = expected.disagreement.clone()
    wrong_disagreement[6][0] += 0.25
    with pytest.raises(AssertionError, match="max \\|ours - eager\\|"):
        rw.check_against_eager("stats", tuple(wrong_disagreement), expected)


@pytest.mark.slow
def test_deployment_latency_smoke(tmp_path, bench_scripts):
    import deployment_latency

    path = tmp_path / "deployment.json"
    assert deployment_latency.main(["--preset", "smoke", "--reps", "1", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert [(p["model"], p["members"], p["batch"]) for p in result["points"]] == [("lenet", 2, 1), ("lenet", 2, 4)]
    for point in result["points"]:
        assert set(point["ms"]) == set(deployment_latency.METHODS)
        assert max(point["relative_error_vs_loop"].values()) < 1e-4  # checked by the script before timing
        assert point["speedup_vs_fused"]["fused"] == 1.0
    assert result["exports"]["lenet"]["pt2_MB"] > 0 and result["onnx_opset"] == 18
    assert result["environment"]["machine"].startswith("cpu")


def test_sharded_ensemble_smoke(tmp_path, bench_scripts):
    import sharded_ensemble

    path = tmp_path / "sharded.json"
    assert sharded_ensemble.main(["--smoke", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["environment"]["machine"].startswith("cpu-") and result["config"]["timed"]
    alone = [p for p in result["points"] if not p["group"]]
    groups = [p for p in result["points"] if p["group"]]
    assert [p["threads"] for p in alone][0] == 1 and [p["processes"] for p in groups] == [1, 2]
    assert groups[1]["member_blocks"] == [2, 2]
    for point in result["points"]:
        assert point["forward_ms"] > 0 and point["train_step_ms"] > 0
        assert len(point["forward_ms_all"]) == sharded_ensemble.SMOKE["reps"]
    for point in groups:
        # The script stops when a count differs from the formula; here the counts are also the formula's.
        for name, counted in point["bytes_counted"].items():
            assert counted["payload_bytes"] == point["bytes_formula"]["payload_bytes"][name], name
    one, two = (point["bytes_counted"] for point in groups)
    assert all(entry["sent_bytes"] == 0 for entry in one.values())  # a group of one sends nothing
    result_bytes = 8 * 10 * 4  # [B, K] float32
    assert two["forward_mean_probs"] == {"payload_bytes": result_bytes, "sent_bytes": result_bytes, "collectives": 1}
    assert two["forward_gather_logits"]["payload_bytes"] == 2 * result_bytes  # 2 members per rank
    assert {row["fabric"] for row in result["estimate_8_gpus"]} == set(result["nccl_figures"]["busbw_GB_per_s"])


def test_sharded_ensemble_bytes_formula(bench_scripts):
    import sharded_ensemble

    # 5 members over 3 ranks (blocks of 2, 2, 1): the all-gather pads to the largest block.
    formula = sharded_ensemble.bytes_formula(5, 4, 7, 3, member_parameters=100)
    payload, sent = formula["payload_bytes"], formula["sent_bytes"]
    assert payload["forward_mean_probs"] == 4 * 7 * 4 and payload["forward_log_mean_probs"] == 2 * 4 * 7 * 4
    assert payload["forward_stats"] == 4 * (2 * 7 + 1) * 4
    assert payload["forward_gather_logits"] == 2 * 4 * 7 * 4 and sent["forward_gather_logits"] == 2 * 2 * 4 * 7 * 4
    assert sent["forward_mean_probs"] == pytest.approx(2 * 2 / 3 * 4 * 7 * 4)
    assert payload["train_step_data_parallel_whole_ensemble"] == 5 * 100 * 4
    # Gathering logits sends N / 2 times the bytes of the sharded all-reduce, whatever B and K.
    for row in sharded_ensemble.bytes_versus_size(8):
        assert row["ratio"] == pytest.approx(row["members"] / 2)
