"""What signals read from the models to build themselves: depths and widths from configs, token models."""

from __future__ import annotations

from torch import nn

from ..modeling import describe, text_config, unwrap
from ..students import model_depth, model_width


def is_token_model(model: nn.Module | None) -> bool:
    """Whether the model reads token ids through input embeddings (a transformers model with an embedding table)."""
    getter = getattr(unwrap(model), "get_input_embeddings", None) if model is not None else None
    try:
        return getter is not None and isinstance(getter(), nn.Embedding)
    except (NotImplementedError, AttributeError):
        return False


def embedding_width(model: nn.Module) -> int:
    """The width of a token model's input embeddings."""
    return int(unwrap(model).get_input_embeddings().embedding_dim)


def layer_geometry(model: nn.Module | None, who: str, weight_names: list[str]) -> tuple[int, int]:
    """(depth, width) of a model from its config, or a clear error for models that declare neither."""
    config = text_config(model)
    depth = model_depth(config) if config is not None else None
    width = model_width(config) if config is not None else None
    if depth is None or width is None:
        raise ValueError(
            f"{' and '.join(weight_names)} > 0 match layers by index, which needs transformers models whose configs "
            f"declare their depth and width (num_hidden_layers, hidden_size); the {who} {describe(model)} declares "
            f"none. Set {' and '.join(weight_names)} to 0 for plain modules."
        )
    return depth, width
