"""How N members of one architecture become one network.

``stacking`` checks the members and stacks their tensors; ``tracing`` traces the member forward with torch.fx;
``graph_runner`` runs the traced graph once for all members, with every value in a ``layout`` (shared,
member-first or channel-packed), each layer through its rule (``rules``) or a generic path (``op_kinds``), and the
hooks registered on the stacked modules around them (``hooks``).
"""
