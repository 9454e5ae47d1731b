"""``export_pt2``: a fused ensemble compiled ahead of time by AOTInductor into a ``.pt2`` package.

The module is exported with ``torch.export`` (dynamic batch), its ensemble ops are decomposed into the PyTorch
reference's aten ops (``decompositions``), so that Inductor compiles the reductions with the rest of the network and
the package runs with ``torch._inductor.aoti_load_package(path)`` in a process that has torch only. The package's
metadata (``get_metadata()``) names the producer, the number of members, the reduction, the outputs and the sample
shape.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from fused_ensemble.deploy.exportable import batch_dim, check_outputs, export_program


def export_pt2(module: nn.Module, example_input: torch.Tensor, path: str | os.PathLike, dynamic_batch: bool = True,
               outputs: Sequence[str] = ("output",)) -> Path:
    """Compiles a ``FusedEnsemble`` or ``OptimizedEnsemble`` (in eval mode) with AOTInductor into a ``.pt2`` package
    for the example input's device (CPU, or CUDA for CUDA modules and inputs), loadable without fused_ensemble::

        runner = torch._inductor.aoti_load_package("ensemble.pt2")
        probs = runner(x)

    Compiling takes tens of seconds to minutes (a C++ compiler must be installed; CUDA packages need the CUDA
    toolkit's compiler where they are compiled, and run on GPUs of that architecture).

    Args:
        module: the ensemble (an ``OptimizedEnsemble`` is exported as for ``export_onnx``).
        example_input: an input batch on the module's device (its dtype and per-sample shape are fixed).
        path: the ``.pt2`` file to write.
        dynamic_batch: whether the package takes any batch size or only the example's.
        outputs: names from ``"output"`` (the module's output) and the fields of ``EnsembleStats``, as for
            ``export_onnx``; the package returns one tensor, or a tuple of them in this order.

    Returns:
        The path written.
    """
    import fused_ensemble

    path = Path(path)
    outputs = check_outputs(outputs)
    program = export_program(module, example_input, dynamic_batch, outputs)
    sample_shape = tuple(example_input.shape[batch_dim(module) + 1:])
    metadata = {
        "producer": f"fused_ensemble {fused_ensemble.__version__}",
        "num_members": str(module.num_members),
        "reduction": module.reduction,
        "member_inputs": str(module.member_inputs).lower(),
        "outputs": ",".join(outputs),
        "input_dtype": str(example_input.dtype).removeprefix("torch."),
        "sample_shape": ",".join(map(str, sample_shape)),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()  # the packager adds to an existing archive
    torch._inductor.aoti_compile_and_package(program, package_path=str(path),
                                             inductor_configs={"aot_inductor.metadata": metadata})
    return path
