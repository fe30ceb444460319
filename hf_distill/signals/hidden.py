"""Intermediate-representation distillation: hidden states through a layer map (FitNets, DistilBERT) and attention
distributions (MiniLM, TinyBERT).

Both terms count *tokens*: every token the attention mask keeps (all tokens without one); padding never counts.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling import unwrap
from .base import BuildContext, Signal, SignalView, upcast_half
from .cross_vocab import AlignedSpans
from .geometry import layer_geometry
from .registry import register_signal

#: `hidden_loss` kinds.
HIDDEN_LOSSES: tuple[str, ...] = ("cosine", "mse")
#: `hidden_projection` modes.
HIDDEN_PROJECTIONS: tuple[str, ...] = ("auto", "linear")

LayerMap = list[tuple[int, int]]


def parse_layer_map(value: Any) -> str | LayerMap:
    """Normalise a `layer_map` setting: ``"auto"``, ``"last"``, or ``[(student_index, teacher_index), ...]`` over
    `hidden_states` indices (0 = embeddings), given as a list of pairs, a JSON string ``"[[1, 2], [2, 4]]"`` or
    ``"1:2,2:4"``."""
    if isinstance(value, str):
        text = value.strip()
        if text in ("auto", "last"):
            return text
        try:
            if text.startswith("["):
                value = json.loads(text)
            else:
                value = [tuple(int(x) for x in pair.split(":")) for pair in text.split(",") if pair.strip()]
        except ValueError as error:
            raise ValueError(
                f"Cannot read layer_map={text!r}: use 'auto', 'last', JSON pairs '[[1, 2], [2, 4]]' or '1:2,2:4' "
                "(student hidden_states index, teacher hidden_states index)."
            ) from error
    if not isinstance(value, Sequence) or not value:
        raise ValueError(f"layer_map must be 'auto', 'last' or a non-empty list of [student, teacher] pairs, got {value!r}.")
    pairs: LayerMap = []
    for pair in value:
        if not isinstance(pair, Sequence) or len(pair) != 2 or not all(isinstance(i, int) and i >= 0 for i in pair):
            raise ValueError(
                f"layer_map entry {pair!r} is not a [student_index, teacher_index] pair of non-negative integers "
                "(hidden_states indices, 0 = embeddings)."
            )
        pairs.append((int(pair[0]), int(pair[1])))
    return pairs


def resolve_layer_map(
    layer_map: Any, student_depth: int, teacher_depth: int, distilled_from_layers: Sequence[int] | None = None
) -> LayerMap:
    """The (student, teacher) `hidden_states` index pairs to match.

    ``"auto"``: student hidden state i+1 <-> teacher hidden state ``distilled_from_layers[i] + 1`` for a student made by
    `shrink_model`, else student i <-> teacher ``round(i * T / S)`` for i = 1..S (evenly spaced). ``"last"``: the last
    hidden states only (S, T). Explicit pairs are checked against both depths.
    """
    spec = parse_layer_map(layer_map)
    if spec == "last":
        return [(student_depth, teacher_depth)]
    if spec == "auto":
        if distilled_from_layers:
            kept = list(distilled_from_layers)
            if len(kept) != student_depth:
                raise ValueError(
                    f"The student's config.distilled_from_layers={kept} lists {len(kept)} layers but the student has "
                    f"{student_depth}: give layer_map explicitly."
                )
            if max(kept) >= teacher_depth:
                raise ValueError(
                    f"The student was cut from teacher layers {kept}, but this teacher has only {teacher_depth} layers: "
                    "is it the teacher the student was shrunk from? Give layer_map explicitly."
                )
            return [(i + 1, layer + 1) for i, layer in enumerate(kept)]
        return [(i, round(i * teacher_depth / student_depth)) for i in range(1, student_depth + 1)]
    for s, t in spec:
        if s > student_depth or t > teacher_depth:
            raise ValueError(
                f"layer_map pair [{s}, {t}] is out of range: the student has hidden_states 0..{student_depth} and the "
                f"teacher 0..{teacher_depth} (0 = embeddings)."
            )
    return list(spec)


def cosine_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per row: 1 - cos(h_s, h_t) = 1 - <h_s, h_t> / (||h_s|| ||h_t||) (DistilBERT's cosine embedding loss)."""
    return 1.0 - F.cosine_similarity(upcast_half(student), upcast_half(teacher), dim=-1, eps=1e-8)


def feature_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per row: mean over features of (h_s - h_t)^2 (FitNets' hint loss)."""
    return (upcast_half(student) - upcast_half(teacher)).pow(2).mean(dim=-1)


def attention_kl(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """KL(A_t || A_s) per query row of attention maps ``[B, H, T, T]`` -> ``[B, T]``, averaged over heads.

    ``sum_k A_t[k] (log A_t[k] - log A_s[k])``, with 0 log 0 = 0. When the head counts differ, both maps are first
    averaged over their heads (a distribution again) and compared once.
    """
    student_probs, teacher_probs = upcast_half(student_probs), upcast_half(teacher_probs)
    if student_probs.shape[1] != teacher_probs.shape[1]:
        student_probs = student_probs.mean(dim=1, keepdim=True)
        teacher_probs = teacher_probs.mean(dim=1, keepdim=True)
    tiny = torch.finfo(student_probs.dtype).tiny
    log_t = teacher_probs.clamp_min(tiny).log()
    log_s = student_probs.clamp_min(tiny).log()
    terms = torch.where(teacher_probs == 0, torch.zeros_like(teacher_probs), teacher_probs * (log_t - log_s))
    return terms.sum(dim=-1).mean(dim=1)


def output_field(outputs: Any, name: str, who: str) -> tuple[torch.Tensor, ...]:
    """``outputs.<name>`` (``hidden_states`` / ``attentions``) of a model output, with a clear error when absent."""
    value = outputs.get(name) if isinstance(outputs, Mapping) else getattr(outputs, name, None)
    if not value or any(v is None for v in value):
        flag = "output_hidden_states" if name == "hidden_states" else "output_attentions"
        raise ValueError(
            f"The {who} returned no `{name}` although {flag}=True was passed. Hidden-state and attention distillation "
            "need transformers models (or modules whose output has them)"
            + (", with eager attention." if name == "attentions" else ".")
        )
    return tuple(value)


def shared_layer_map(context: BuildContext) -> LayerMap:
    """The layer map the hidden-state and attention signals share, resolved once from `layer_map` and both models'
    depths (`resolve_layer_map`)."""

    def resolve() -> LayerMap:
        names = [cls.weight_field for cls in (HiddenStateSignal, AttentionSignal) if context.weight(cls.weight_field) > 0]
        student_depth, _ = layer_geometry(context.student, "student", names)
        teacher_depth, _ = layer_geometry(context.teacher, "teacher", names)
        distilled_from = getattr(getattr(unwrap(context.student), "config", None), "distilled_from_layers", None)
        return resolve_layer_map(context.args.layer_map, student_depth, teacher_depth, distilled_from)

    return context.shared("layer_map", resolve)


@register_signal
class HiddenStateSignal(Signal):
    """Hidden-state matching through a layer map, summed over counted tokens and averaged over the mapped pairs:

    ``sum_tokens (1 / |map|) sum_(s, t) d(P_st(h_s[s]), h_t[t])`` with d = 1 - cos or the feature-mean squared error and
    P_st a learned linear projection (FitNets' f_w) where widths differ (identity otherwise, unless
    ``projection="linear"``).
    """

    name = "hidden"
    weight_field = "hidden_weight"
    works_across_tokenizers = True  # (hidden_span_pooling="mean": each aligned span's mean state)
    build_order = 20
    option_fields = ("hidden_loss", "layer_map", "hidden_projection", "hidden_span_pooling")
    option_choices = {"hidden_loss": HIDDEN_LOSSES, "hidden_projection": HIDDEN_PROJECTIONS}
    unit = "tokens"
    reads_logits = False
    needs_hidden_states = True

    def __init__(
        self,
        kind: str,
        layer_map: LayerMap,
        student_width: int,
        teacher_width: int,
        projection: str = "auto",
    ) -> None:
        self.kind = kind  # (kind and projection are checked by `check_options` with the settings)
        self.layer_map = list(layer_map)
        self.projections = nn.ModuleDict()
        if projection == "linear" or student_width != teacher_width:
            for s, t in self.layer_map:
                self.projections[f"{s}_{t}"] = nn.Linear(student_width, teacher_width)

    @classmethod
    def from_config(cls, context: BuildContext) -> "HiddenStateSignal":
        layer_map = shared_layer_map(context)
        names = [cls.weight_field]
        _, student_width = layer_geometry(context.student, "student", names)
        _, teacher_width = layer_geometry(context.teacher, "teacher", names)
        args = context.args
        return cls(args.hidden_loss, layer_map, student_width, teacher_width, args.hidden_projection)

    @classmethod
    def check_options(cls, args: Any) -> None:
        super().check_options(args)
        if hasattr(args, "layer_map"):
            parse_layer_map(args.layer_map)  # raises with the accepted formats

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"hidden_projections": self.projections} if len(self.projections) else {}

    def loss_sum(self, view: SignalView) -> torch.Tensor:
        student_states = output_field(view.student_outputs, "hidden_states", "student")
        teacher_states = output_field(view.teacher_outputs, "hidden_states", "teacher")
        if isinstance(view.teacher_targets, AlignedSpans):  # another tokenizer: span means (`hidden_span_pooling`)
            return self.span_loss_sum(student_states, teacher_states, view.teacher_targets.pooling)
        mask = view.token_mask()
        distance = cosine_distance if self.kind == "cosine" else feature_mse
        total = None
        for s, t in self.layer_map:
            student = student_states[s][mask]
            key = f"{s}_{t}"
            if key in self.projections:
                projection = self.projections[key]
                student = projection(student.to(projection.weight.dtype))
            value = distance(student, teacher_states[t][mask].detach()).sum()
            total = value if total is None else total + value
        return total / len(self.layer_map)

    def span_loss_sum(self, student_states: Sequence[torch.Tensor], teacher_states: Sequence[torch.Tensor],
                      pooling: Any) -> torch.Tensor:
        """Across tokenizers: ``sum_spans n_s(span) (1 / |map|) sum_(s, t) d(P_st(mean_span h_s[s]),
        mean_span h_t[t])``, each span weighted by its student tokens (one token per span: the per-token term)."""
        weights = pooling.student_counts.to(student_states[0].device)
        distance = cosine_distance if self.kind == "cosine" else feature_mse
        total = None
        for s, t in self.layer_map:
            student = pooling.student(student_states[s])
            key = f"{s}_{t}"
            if key in self.projections:
                projection = self.projections[key]
                student = projection(student.to(projection.weight.dtype))
            value = (distance(student, pooling.teacher(teacher_states[t]).detach()) * weights).sum()
            total = value if total is None else total + value
        return total / len(self.layer_map)


@register_signal
class AttentionSignal(Signal):
    """Attention-distribution matching (MiniLM / TinyBERT): per counted query token, the KL between teacher and
    student attention rows of mapped layers, averaged over heads and over the mapped layer pairs, summed over tokens.

    Layer pairs are attention-layer indices (0-based): hidden-state pair (s, t) with s, t >= 1 maps attention layers
    (s - 1, t - 1). Needs eager attention (the trainer switches to it) and a student without attention dropout.
    """

    name = "attention"
    weight_field = "attention_weight"
    build_order = 30
    option_fields = ("layer_map",)
    unit = "tokens"
    reads_logits = False
    needs_attentions = True

    def __init__(self, layer_pairs: LayerMap) -> None:
        if not layer_pairs:
            raise ValueError(
                "attention_weight > 0 needs at least one mapped transformer layer, but the layer map pairs only the "
                "embeddings (index 0). Use layer_map='auto', 'last' or pairs with indices >= 1."
            )
        self.layer_pairs = list(layer_pairs)

    @classmethod
    def from_config(cls, context: BuildContext) -> "AttentionSignal":
        return cls(attention_pairs(shared_layer_map(context)))

    def loss_sum(self, view: SignalView) -> torch.Tensor:
        student_maps = output_field(view.student_outputs, "attentions", "student")
        teacher_maps = output_field(view.teacher_outputs, "attentions", "teacher")
        mask = view.token_mask()
        total = None
        for s, t in self.layer_pairs:
            student, teacher = student_maps[s], teacher_maps[t].detach()
            if student.shape[-2:] != teacher.shape[-2:]:
                raise ValueError(
                    f"Attention maps of student layer {s} {tuple(student.shape)} and teacher layer {t} "
                    f"{tuple(teacher.shape)} cover different tokens: both models must see the same batch."
                )
            value = attention_kl(student, teacher)[mask].sum()
            total = value if total is None else total + value
        return total / len(self.layer_pairs)


def attention_pairs(layer_map: LayerMap) -> LayerMap:
    """Attention-layer pairs of a hidden-state layer map: (s - 1, t - 1) for every pair with s, t >= 1."""
    return [(s - 1, t - 1) for s, t in layer_map if s >= 1 and t >= 1]
