"""The one backend dispatch of the ensemble ops: why a backend cannot run an input, the priority lists of "auto",
the failure memory, and errors that give every backend's reason."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from fused_ensemble import config, ensemble_linear_reduce, ensemble_reduce, ensemble_stats, extension
from fused_ensemble.ops import dispatch, library
from fused_ensemble.ops.reference import reduce_reference


def _settings(monkeypatch, **changes):
    monkeypatch.setattr(config, "settings", dataclasses.replace(config.settings, **changes))


def test_unavailable_backends_say_why(monkeypatch):
    x = torch.randn(3, 4, 5)
    _settings(monkeypatch, triton_interpret=False)
    if dispatch.unavailable_reason("triton", "cuda", torch.float32) is None:
        with pytest.raises(RuntimeError, match=r"triton kernels need a CUDA tensor \(or TRITON_INTERPRET=1\)"):
            ensemble_reduce(x, backend="triton")
    _settings(monkeypatch, triton_interpret=True)
    if dispatch.unavailable_reason("triton", "cpu", torch.float32) is None:
        with pytest.raises(RuntimeError, match="take float16, bfloat16 or float32 inputs, got torch.float64"):
            ensemble_reduce(x.double(), backend="triton")

    if extension.load_extension() and not extension.has_cuda_kernels():
        assert "built without CUDA kernels" in dispatch.unavailable_reason("cpp", "cuda", torch.float32)

    # Simulate a machine without triton and without a built extension.
    monkeypatch.setattr(dispatch, "_triton_import_problems", {})
    monkeypatch.setattr(dispatch.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(extension, "load_extension", lambda: False)
    monkeypatch.setattr(extension, "extension_status", lambda: "fused_ensemble._C was not found")
    with pytest.raises(RuntimeError, match="backend='triton' is unavailable: triton is not installed"):
        ensemble_reduce(x, backend="triton")
    with pytest.raises(RuntimeError, match="backend='cpp' is unavailable: the C[+][+] extension is not built: "
                                           "fused_ensemble._C was not found"):
        ensemble_reduce(x, backend="cpp")
    assert dispatch.resolve_backend("auto", "cuda", torch.float32) == "torch"
    torch.testing.assert_close(ensemble_reduce(x), reduce_reference(x))


def test_the_error_of_an_unavailable_backend_gives_every_reason(monkeypatch):
    monkeypatch.setattr(dispatch, "_triton_import_problems", {})
    monkeypatch.setattr(dispatch.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(extension, "load_extension", lambda: False)
    monkeypatch.setattr(extension, "extension_status", lambda: "not built here")
    with pytest.raises(RuntimeError) as error:
        ensemble_stats(torch.randn(3, 4, 5), backend="cpp")
    message = str(error.value)
    assert "backend='cpp' is unavailable: the C++ extension is not built: not built here" in message
    assert "triton: triton is not installed" in message and "torch: can run it" in message


def test_every_op_and_backend_has_an_answer():
    for op in dispatch.OPS:
        for backend in dispatch.BACKENDS[1:]:
            reason = dispatch.unavailable_reason(backend, "cpu", torch.float32, op)
            assert reason is None or isinstance(reason, str)
        assert dispatch.auto_priority("cpu", op)[-1] == "torch"
        assert dispatch.auto_priority("cuda", op, "mean_probs", 10, 5)[-1] == "torch"
    with pytest.raises(ValueError, match="unknown ensemble op"):
        dispatch.resolve_backend("auto", "cpu", torch.float32, "sum")


def test_auto_prefers_the_kernels_for_the_device():
    cpp_ok = dispatch.unavailable_reason("cpp", "cpu", torch.float32) is None
    assert dispatch.resolve_backend("auto", "cpu", torch.float32) == ("cpp" if cpp_ok else "torch")
    if cpp_ok:
        # float64 is a cpp dtype; triton is never chosen for CPU tensors, even under the interpreter.
        assert dispatch.resolve_backend("auto", "cpu", torch.float64) == "cpp"


def _resolve(workload, classes=None, rows=None, device_index=None, device="cuda", backend="auto"):
    op, reduction = ("stats", None) if workload == "stats" else ("reduce", workload)
    return dispatch.resolve_backend(backend, device, torch.float32, op, reduction, classes, rows, device_index)


def test_auto_on_cuda_takes_the_cuda_cpp_kernels_for_tiny_rows(monkeypatch):
    # Where both kernel backends could run: the CUDA C++ kernels first for "mean" and for tiny rows of the
    # per-member softmax workloads (measured faster there), Triton first everywhere else.
    available = {"triton", "cpp"}
    monkeypatch.setattr(dispatch, "unavailable_reason",
                        lambda backend, device, dtype, op="reduce": None if backend in available else "not here")
    for workload in ("mean_probs", "log_mean_probs", "stats"):
        assert _resolve(workload, 10) == "cpp"
        assert _resolve(workload, dispatch.CUDA_CPP_MAX_CLASSES + 1) == "triton"
    assert _resolve("softmax_of_mean", 10) == "triton"
    for classes in (10, 128256):
        assert _resolve("mean", classes) == "cpp"
    assert dispatch.resolve_backend("auto", "cuda", torch.float32) == "triton"  # no reduction or shape given
    assert _resolve("stats", 10, device="cpu") == "cpp"
    available.discard("cpp")
    assert _resolve("stats", 10) == "triton"
    assert _resolve("stats", 10, backend="triton") == "triton"  # explicit choices stand


def test_auto_on_cuda_takes_the_cuda_cpp_kernels_for_many_long_rows(monkeypatch):
    # At least one row per multiprocessor of 4097-32768 classes: CUDA C++ first for mean_probs, softmax_of_mean and
    # stats (one block per row, accumulators on chip), Triton for fewer rows, longer rows and log_mean_probs.
    monkeypatch.setattr(dispatch, "unavailable_reason", lambda backend, device, dtype, op="reduce": None)
    monkeypatch.setattr(dispatch, "_multiprocessors", lambda device_index: 132)
    for workload in ("mean_probs", "softmax_of_mean", "stats"):
        assert _resolve(workload, 32000, 132, 0) == "cpp"
        assert _resolve(workload, 32000, 131, 0) == "triton"
        assert _resolve(workload, 4096, 5000, 0) == "triton"
        assert _resolve(workload, 32769, 5000, 0) == "triton"
        assert _resolve(workload, 32000) == "triton"  # rows unknown
        assert _resolve(workload, 32000, 5000, device="cpu") == "cpp"
    assert _resolve("log_mean_probs", 32000, 5000, 0) == "triton"


def test_auto_on_cuda_runs_the_head_fused_and_never_for_inputs_that_need_grad(monkeypatch):
    monkeypatch.setattr(dispatch, "unavailable_reason", lambda backend, device, dtype, op="reduce": None)
    resolve = dispatch.resolve_backend
    assert resolve("auto", "cuda", torch.float32, "linear_reduce", "mean_probs", 10, 64) == "triton"
    assert resolve("auto", "cuda", torch.float32, "linear_reduce", "mean_probs", 10, 64,
                   requires_grad=True) == "cpp"
    assert resolve("auto", "cuda", torch.float32, "stats", None, 1000, 64, requires_grad=True) == "torch"
    with pytest.raises(RuntimeError, match="inference only"):
        resolve("triton", "cuda", torch.float32, "linear_reduce", requires_grad=True)


def test_auto_is_told_the_rows_without_the_member_dim(monkeypatch):
    seen = []
    resolve = dispatch.resolve_backend
    monkeypatch.setattr(dispatch, "resolve_backend", lambda *args: seen.append(args) or resolve(*args))
    x = torch.randn(3, 5, 7, 11)
    ensemble_reduce(x, "mean_probs", dim=1)
    ensemble_stats(x, dim=-2)
    assert [args[3:7] for args in seen] == [("reduce", "mean_probs", 11, 21), ("stats", None, 11, 15)]


def test_auto_remembers_a_failed_kernel_and_falls_back(monkeypatch):
    class BrokenKernels:
        calls = 0

        def reduce_forward(self, x, reduction):
            BrokenKernels.calls += 1
            raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(dispatch, "_failed_under_auto", set())
    monkeypatch.setattr(dispatch, "unavailable_reason", lambda backend, device_type, dtype, op="reduce": None)
    monkeypatch.setattr(library, "kernels", lambda backend: BrokenKernels())
    x = torch.randn(3, 4, 5)
    with pytest.warns(RuntimeWarning, match="the cpp kernels of reduce failed on a cpu tensor"):
        out = ensemble_reduce(x, "softmax_of_mean")
    torch.testing.assert_close(out, reduce_reference(x, "softmax_of_mean"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ensemble_reduce(x, "softmax_of_mean")   # remembered: no second try, no second warning
    assert BrokenKernels.calls == 1
    with pytest.raises(RuntimeError, match="no kernel image"):
        ensemble_reduce(x, "softmax_of_mean", backend="cpp")   # an explicit backend is never second-guessed


def test_a_failed_fused_head_falls_back_to_the_gemm(monkeypatch):
    """The head's fallback is the same machinery: the Triton head kernel fails once under "auto", warns, and the
    GEMM + reduction path answers from then on."""
    import importlib

    calls = []

    class BrokenHead:
        @staticmethod
        def head_forward(*args):
            calls.append(1)
            raise RuntimeError("broken head kernel")

    real_import = importlib.import_module
    monkeypatch.setattr(dispatch, "_failed_under_auto", set())
    monkeypatch.setattr(dispatch, "auto_priority", lambda *args: ("triton", "cpp", "torch"))
    monkeypatch.setattr(dispatch, "unavailable_reason", lambda backend, device_type, dtype, op="reduce": None)
    monkeypatch.setattr(importlib, "import_module",
                        lambda name: BrokenHead if name.endswith("ensemble_head") else real_import(name))
    x, weight, bias = torch.randn(4, 6), torch.randn(3, 5, 6), torch.randn(3, 5)
    expected = reduce_reference(torch.stack([x @ w.T + b for w, b in zip(weight, bias)]), "mean_probs")
    with pytest.warns(RuntimeWarning, match="broken head kernel"):
        torch.testing.assert_close(ensemble_linear_reduce(x, weight, bias), expected)
    torch.testing.assert_close(ensemble_linear_reduce(x, weight, bias), expected)
    assert len(calls) == 1 and ("triton", "cpu", "linear_reduce") in dispatch._failed_under_auto


# ---- what may disable a kernel under "auto": only the kernel's own failure ----------------------------------

needs_cpp = pytest.mark.skipif(dispatch.unavailable_reason("cpp", "cpu", torch.float32) is not None,
                               reason="needs the C++ extension")


@pytest.fixture
def cpp_calls(monkeypatch):
    """A fresh failure memory, and the names of the kernel backends that library.kernels is asked for."""
    calls = []
    real = library.kernels
    monkeypatch.setattr(dispatch, "_failed_under_auto", set())
    monkeypatch.setattr(library, "kernels", lambda backend: calls.append(backend) or real(backend))
    return calls


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")
@needs_cpp
def test_a_caller_mistake_raises_a_clear_error_and_disables_nothing(cpp_calls):
    x = torch.randn(3, 4, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "kernel failed" warning either
        for sparse in (x.to_sparse(), x[0].to_sparse_csr()):
            with pytest.raises(TypeError, match=r"logits must be a dense \(strided\) tensor, got layout torch.sparse"):
                ensemble_reduce(sparse)
            with pytest.raises(TypeError, match=r"logits must be a dense \(strided\) tensor"):
                ensemble_stats(sparse)
        with pytest.raises(TypeError, match=r"weight must be a dense \(strided\) tensor"):
            ensemble_linear_reduce(torch.randn(2, 5), torch.randn(3, 4, 5).to_sparse(), None)
        with pytest.raises(TypeError, match="logits must be a floating-point tensor"):
            ensemble_reduce(torch.ones(3, 4, 5, dtype=torch.int32))
        with pytest.raises(ValueError, match="the member dim must be another dim"):
            ensemble_reduce(x, dim=-1)
        meta = ensemble_reduce(torch.empty(3, 4, 5, device="meta"))  # the kernels take no meta tensor: torch does
        assert meta.shape == (4, 5) and meta.device.type == "meta"
    assert not dispatch._failed_under_auto and cpp_calls == []
    torch.testing.assert_close(ensemble_reduce(x), reduce_reference(x))
    assert cpp_calls == ["cpp"]  # the kernel still runs


def _fail_with(monkeypatch, exc):
    class FailingKernels:
        calls = 0

        def reduce_forward(self, x, reduction):
            FailingKernels.calls += 1
            raise exc

    monkeypatch.setattr(dispatch, "_failed_under_auto", set())
    monkeypatch.setattr(dispatch, "unavailable_reason", lambda backend, device_type, dtype, op="reduce": None)
    monkeypatch.setattr(library, "kernels", lambda backend: FailingKernels())
    return FailingKernels


@pytest.mark.parametrize("exc", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried "
                 "to allocate 80000000000 bytes. Error code 12 (Cannot allocate memory)"),
    RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 80000000000 bytes."),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 74.51 GiB"),
], ids=["cpu-allocator", "cpu-allocator-older-words", "torch.OutOfMemoryError"])
def test_out_of_memory_passes_through_and_disables_nothing(monkeypatch, exc):
    kernels = _fail_with(monkeypatch, exc)
    x = torch.randn(3, 4, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(2):
            with pytest.raises(type(exc), match="memory"):
                ensemble_reduce(x, "mean_probs")
    assert kernels.calls == 2 and not dispatch._failed_under_auto  # asked again: still enabled
    assert dispatch.is_out_of_memory(exc)


@needs_cpp
def test_a_real_cpu_out_of_memory_passes_through(cpp_calls):
    # 2^58 rows of one class: the 2^60-byte output cannot be allocated (more than any address space).
    x = torch.zeros(2, 1, 1).expand(2, 1 << 58, 1)
    with pytest.raises(RuntimeError, match="DefaultCPUAllocator"):
        ensemble_reduce(x, "mean_probs")
    assert cpp_calls == ["cpp"] and not dispatch._failed_under_auto
    ensemble_reduce(torch.randn(3, 4, 5), "mean_probs")
    assert cpp_calls == ["cpp", "cpp"]


def test_a_kernel_failure_disables_it_once_with_one_warning(monkeypatch):
    kernels = _fail_with(monkeypatch, RuntimeError("no kernel image is available for execution on the device"))
    x = torch.randn(3, 4, 5)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            torch.testing.assert_close(ensemble_reduce(x, "mean_probs"), reduce_reference(x, "mean_probs"))
    assert kernels.calls == 1
    assert [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)] == [
        "fused_ensemble: the cpp kernels of reduce failed on a cpu tensor (RuntimeError: no kernel image is available "
        "for execution on the device); backend='auto' uses the next backend for reduce on cpu tensors from now on in "
        "this process"]
    assert dispatch._failed_under_auto == {("cpp", "cpu", "reduce")}
    dispatch.note_auto_failure("cpp", "cpu", "reduce", RuntimeError("again"))  # said once: no second warning
    assert not dispatch.is_out_of_memory(RuntimeError("no kernel image is available"))
