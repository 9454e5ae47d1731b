"""Deployment: safe checkpoints and inference artifacts of a fused ensemble.

- ``checkpoint``: ``save`` / ``load``, one safetensors file holding the stacked tensors (a subset of the members can
  be loaded, reading only their slices);
- ``member_checkpoints``: N per-member checkpoints in (``FusedEnsemble.from_checkpoints``) and out
  (``FusedEnsemble.save_members``);
- ``member_tensors``: what a member's checkpoint must hold, and an ensemble whose stacks are filled member by member;
- ``decompositions``: the ensemble ops rewritten as the PyTorch reference's aten ops, so exported graphs need
  nothing of this package;
- ``exportable``: the forward that is exported (the module's output and ``ensemble_stats`` fields) and its
  ``torch.export`` with a dynamic batch;
- ``onnx_export`` / ``pt2_export``: ``export_onnx`` (ONNX Runtime) and ``export_pt2`` (an AOTInductor package).

Nothing here executes pickled code: checkpoints are safetensors, or torch files read with ``weights_only=True``.
"""
