"""Model size."""

from torch import nn


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters; tied weights (GPT-2's wte and lm_head) count once.

    nn.Module.parameters() already skips a tensor it has seen, which is what
    makes distilgpt2 81.91M rather than 120.5M.
    """
    return sum(p.numel() for p in model.parameters())
