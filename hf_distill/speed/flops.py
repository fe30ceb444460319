"""FLOP counts of a distillation step, per token, from a model's own layers: what the benchmarks divide by to give the
achieved FLOP/s and its share of the machine's matmul limit (docs/performance.md, section 8).

Counted: every ``nn.Linear`` (``2 * in * out`` per token: one multiply and one add per weight), the attention's two
batched products (``Q K^T`` and ``A V``: ``2 * 2 * heads * head_dim * L`` per token, ``L = (T + 1) / 2`` keys on average
under a causal mask of T positions, ``T`` for a bidirectional encoder), and the output layer (an ``nn.Linear`` too,
reported apart). Not counted: embeddings (look-ups), norms, activations, softmax and the loss (element-wise, a few
FLOPs per element: below 1% of a decoder's matmuls). A training step's backward is twice its forward (the gradients
of the inputs and of the weights, each one product per forward product).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..modeling import text_config


@dataclass(frozen=True)
class MatmulShape:
    """One product of the forward: ``[rows, inner] @ [inner, cols]``, `count` times per step, `part` of the model."""

    rows: int
    inner: int
    cols: int
    count: int
    part: str
    share: float = 1.0  #: the part of the product that is done (a causal attention kernel: (T + 1) / 2T)

    @property
    def flops(self) -> float:
        return 2.0 * self.rows * self.inner * self.cols * self.count * self.share


@dataclass(frozen=True)
class ForwardFlops:
    """FLOPs per token of one forward pass: ``layers`` (the linear layers below the output layer), ``attention``
    (``Q K^T`` and ``A V``), ``output`` (the output layer); ``total`` their sum."""

    layers: float
    attention: float
    output: float

    @property
    def total(self) -> float:
        return self.layers + self.attention + self.output


def _output_layer(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if callable(getter) else None


def forward_flops_per_token(model: nn.Module, seq_len: int, causal: bool = True) -> ForwardFlops:
    """`ForwardFlops` of `model` on sequences of `seq_len` tokens: its ``nn.Linear`` layers as they are (so a cut or
    a LoRA-wrapped model counts what it runs), the attention from its config (heads, head_dim, layers)."""
    head = _output_layer(model)
    layers = output = 0.0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            flops = 2.0 * module.in_features * module.out_features
            if module is head:
                output += flops
            else:
                layers += flops
    config = text_config(model)
    attention = 0.0
    if config is not None and getattr(config, "num_attention_heads", None):
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        keys = (seq_len + 1) / 2 if causal else seq_len
        attention = 2 * 2 * heads * head_dim * keys * config.num_hidden_layers
    return ForwardFlops(layers, attention, output)


@dataclass(frozen=True)
class StepFlops:
    """FLOPs per token of one distillation step: the teacher's forward, the student's forward, the student's
    backward (2x its forward); ``total`` their sum."""

    teacher_forward: float
    student_forward: float

    @property
    def student_backward(self) -> float:
        return 2 * self.student_forward

    @property
    def total(self) -> float:
        return self.teacher_forward + 3 * self.student_forward

    def as_dict(self) -> dict[str, float]:
        return {"teacher_forward": self.teacher_forward, "student_forward": self.student_forward,
                "student_backward": self.student_backward, "total": self.total}


def distillation_flops_per_token(teacher: nn.Module | None, student: nn.Module, seq_len: int,
                                 causal: bool = True) -> StepFlops:
    """``teacher forward + 3 * student forward`` per token (`forward_flops_per_token` of each; no teacher: a cached
    one, 0)."""
    teacher_flops = forward_flops_per_token(teacher, seq_len, causal).total if teacher is not None else 0.0
    return StepFlops(teacher_flops, forward_flops_per_token(student, seq_len, causal).total)


def matmul_shapes(model: nn.Module, tokens: int, seq_len: int, batch: int, chunk: int | None = None,
                  backward: bool = False, causal: bool = True, output_rows: int | None = None,
                  name: str = "") -> list[MatmulShape]:
    """The products one forward (and, with `backward`, its backward) of `model` runs on `tokens` = batch x seq_len
    positions, grouped by shape: each linear layer ``[tokens, in] @ [in, out]`` (the output layer on its `output_rows`,
    default `tokens`, `chunk` rows at a time when given: the chunked loss), the attention's ``[T, d] @ [d, T]`` per head and sequence. Backward adds, per
    product, ``[rows, out] @ [out, in]`` (input gradient) and ``[in, rows] @ [rows, out]`` (weight gradient). Parts are
    named ``"{name} layers"``, ``"{name} output"``, ``"{name} attention"``."""
    head = _output_layer(model)
    groups: dict[tuple[int, int, int, str, float], int] = {}

    def add(rows: int, inner: int, cols: int, part: str, count: int = 1, share: float = 1.0) -> None:
        key = (rows, inner, cols, part, share)
        groups[key] = groups.get(key, 0) + count

    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        n_in, n_out = module.in_features, module.out_features
        part = f"{name} output".strip() if module is head else f"{name} layers".strip()
        if module is head and chunk:
            full, rest = divmod(output_rows or tokens, chunk)
            pieces = ([(chunk, full)] if full else []) + ([(rest, 1)] if rest else [])
        elif module is head:
            pieces = [(output_rows or tokens, 1)]
        else:
            pieces = [(tokens, 1)]
        for rows, count in pieces:
            add(rows, n_in, n_out, part, count)
            if backward:
                add(rows, n_out, n_in, part, count)
                add(n_in, rows, n_out, part, count)
    config = text_config(model)
    if config is not None and getattr(config, "num_attention_heads", None):
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        count = batch * heads * config.num_hidden_layers * (3 if backward else 1)
        share = (seq_len + 1) / (2 * seq_len) if causal else 1.0  # (a causal kernel does about half of each)
        add(seq_len, head_dim, seq_len, f"{name} attention".strip(), count, share)  # Q K^T: [T, d] @ [d, T]
        add(seq_len, seq_len, head_dim, f"{name} attention".strip(), count, share)  # A V: [T, T] @ [T, d]
    return [MatmulShape(r, i, c, n, p, f) for (r, i, c, p, f), n in groups.items()]
