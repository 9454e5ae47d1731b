"""How each kind of layer runs for all N members at once: one rule interface and one registry
(``fused_ensemble.fusion.rules.registry``), and a module per layer kind that registers its rules on import.

Layers without a rule run on the graph runner's generic paths (see ``fused_ensemble.fusion.graph_runner``).
"""

from fused_ensemble.fusion.rules import (  # noqa: F401  (imported to register their rules)
    activation,
    attention,
    convolution,
    dropout,
    embedding,
    linear,
    normalization,
    recurrent,
    transformer,
)
from fused_ensemble.fusion.rules.registry import (
    FusionContext,
    LayerCall,
    OneInputRule,
    Rule,
    layer_rule,
    member_shape,
    register,
    rule_for,
    unsupported_reason,
)

__all__ = ["FusionContext", "LayerCall", "OneInputRule", "Rule", "layer_rule", "member_shape", "register",
           "rule_for", "unsupported_reason"]
