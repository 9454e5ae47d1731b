"""The ensemble ops: reductions over the member dim, uncertainty statistics and the fused ensemble head.

``ensemble_reduce``, ``ensemble_stats`` and ``ensemble_linear_reduce`` check their inputs, let one dispatch
(``dispatch``) choose a backend (Triton, C++/CUDA C++, or the PyTorch reference in ``reference``), and run its
kernels through the ``torch.library`` custom ops of ``library``. The reductions and their contract are written
once, in ``reductions``. The public functions are exported by ``fused_ensemble`` itself.
"""
