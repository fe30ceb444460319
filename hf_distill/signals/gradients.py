"""Gradient signals: input-gradient matching (Sobolev training), adversarial gradient matching (GREAT) and
feature-gradient matching.

All compare g = d(sum of the per-example task loss against the labels) / d(representation) of teacher and student.
The student's gradient keeps its graph while training (``create_graph=True``) so the term trains the student; the
teacher's is detached. These signals run their own forward and backward passes, and only when their weight is > 0.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..engines import average_gradients
from ..modeling import model_inputs, output_logits, unwrap
from .base import BuildContext, Signal, SignalView
from .geometry import embedding_width, is_token_model
from .registry import register_signal
from .task import task_loss_sum


def float_input_key(inputs: dict[str, Any], label_names: tuple[str, ...], key: str | None = None) -> str:
    """The batch key of the float input to differentiate: `key` if given, else the only float tensor that is not a
    label."""
    if key is not None:
        if key not in inputs or not torch.is_tensor(inputs[key]) or not torch.is_floating_point(inputs[key]):
            raise ValueError(f"input_grad_key={key!r} is not a float tensor of the batch (keys: {sorted(inputs)}).")
        return key
    candidates = [k for k, v in inputs.items()
                  if k not in label_names and torch.is_tensor(v) and torch.is_floating_point(v)]
    if len(candidates) != 1:
        raise ValueError(
            f"Input-gradient signals need one float input to differentiate; the batch has {candidates or 'none'}. "
            "Name it with input_grad_key=..."
        )
    return candidates[0]


def _task_sum(outputs: Any, view: SignalView) -> torch.Tensor:
    if view.labels is None:
        raise ValueError(
            "Gradient signals differentiate the task loss against the labels, but this batch has none: add labels, or "
            "set input_grad_weight / adversarial_grad_weight / feature_grad_weight to 0."
        )
    return task_loss_sum(output_logits(outputs), view.labels, view.mask, view.unit)


def _rows(gradient: torch.Tensor, row_mask: torch.Tensor | None) -> torch.Tensor:
    """Gradients as ``[rows, features]``: counted tokens (when `row_mask` is given), else one flat row per example."""
    if row_mask is not None:
        return gradient[row_mask]
    return gradient.reshape(gradient.shape[0], -1)


def input_gradients(
    view: SignalView, key: str | None, embeddings: bool, projection: nn.Module | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g_s, g_t)`` of one batch, ``[rows, features]``, computed once and shared by the Sobolev and GREAT terms.

    Continuous models: g = d(sum_i l_i) / dx for the float input x (one row per example). Token models: the teacher's
    input embeddings e of the batch are fed to both models as `inputs_embeds` (through the student's projection when
    widths differ) and g = d(sum_i l_i) / de at the counted tokens (one row per token).
    """
    cached = view.cache.get("input_gradients")
    if cached is not None:
        return cached
    # the bare modules: extra passes must not go through a DDP wrapper's once-per-step bookkeeping
    student, teacher = unwrap(view.student_model), unwrap(view.teacher_model)
    drop = tuple(view.label_names)
    if embeddings:
        with torch.no_grad():
            base = unwrap(teacher).get_input_embeddings()(view.inputs["input_ids"])
        feed_key, drop, rows = "inputs_embeds", (*drop, "input_ids"), view.token_mask()
    else:
        feed_key = float_input_key(dict(view.inputs), drop, key)
        base, rows = view.inputs[feed_key], None
    x_teacher = base.detach().clone().requires_grad_(True)
    x_student = base.detach().clone().requires_grad_(True)
    student_input = projection(x_student) if projection is not None else x_student
    with torch.enable_grad():
        outputs = teacher(**model_inputs(teacher, {**view.inputs, feed_key: x_teacher}, drop=drop))
        (g_teacher,) = torch.autograd.grad(_task_sum(outputs, view), x_teacher)
        outputs = student(**model_inputs(student, {**view.inputs, feed_key: student_input}, drop=drop))
        (g_student,) = torch.autograd.grad(_task_sum(outputs, view), x_student, create_graph=view.training)
    result = (_rows(g_student, rows), _rows(g_teacher, rows).detach())
    view.cache["input_gradients"] = result
    return result


def _shared_input_gradient(context: BuildContext) -> "InputGradientSignal":
    """The one input-gradient computation Sobolev and GREAT share (its projection and per-batch gradients)."""

    def make() -> InputGradientSignal:
        args, student, teacher = context.args, context.student, context.teacher
        embeddings = args.input_grad_key is None and is_token_model(student) and is_token_model(teacher)
        widths = (embedding_width(teacher), embedding_width(student)) if embeddings else (None, None)
        return InputGradientSignal(args.input_grad_key, embeddings, *widths)

    return context.shared("input_gradient", make)


class _GradientSignal(Signal):
    """What every gradient signal declares: it differentiates the task loss, so it needs labels and a teacher of its
    own (a live model it can differentiate), and it cannot learn from a cache."""

    needs_labels = True
    needs_separate_teacher = True
    differentiates_teacher = True


@register_signal
class InputGradientSignal(_GradientSignal):
    """Sobolev training (Czarnecki et al. 2017): ``sum over rows of mean over features (g_t - g_s)^2`` with g the
    input gradient of the summed per-example task loss (see `input_gradients`)."""

    name = "input_grad"
    weight_field = "input_grad_weight"
    build_order = 40
    option_fields = ("input_grad_key",)

    def __init__(self, key: str | None, embeddings: bool, teacher_width: int | None = None,
                 student_width: int | None = None) -> None:
        self.key = key
        self.embeddings = embeddings
        self.unit = "tokens" if embeddings else "positions"
        #: the student's input gradient is differentiated again: its attention must support double backward (eager)
        self.differentiates_twice = embeddings
        self.projection = (
            nn.Linear(teacher_width, student_width)
            if embeddings and teacher_width and student_width and teacher_width != student_width
            else None
        )

    @classmethod
    def from_config(cls, context: BuildContext) -> "InputGradientSignal":
        return _shared_input_gradient(context)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"embedding_projection": self.projection} if self.projection is not None else {}

    def loss_sum(self, view: SignalView) -> torch.Tensor:
        g_student, g_teacher = input_gradients(view, self.key, self.embeddings, self.projection)
        return (g_teacher.float() - g_student.float()).pow(2).mean(dim=-1).sum()


@register_signal
class AdversarialGradientSignal(_GradientSignal):
    """GREAT (Sinha et al. 2018): a discriminator D (an MLP on gradient rows) learns with its own Adam optimizer to
    tell teacher input gradients (label 1) from student ones (label 0); the student term is
    ``sum over rows of -log D(g_s)`` (= softplus(-logit)). D updates once per optimizer step, after the student."""

    name = "adversarial_grad"
    weight_field = "adversarial_grad_weight"
    build_order = 50
    option_fields = ("input_grad_key", "discriminator_lr")

    def __init__(self, key: str | None, embeddings: bool, lr: float, input_gradient: InputGradientSignal,
                 hidden: int = 64) -> None:
        self.key = key
        self.embeddings = embeddings
        self.unit = "tokens" if embeddings else "positions"
        self.differentiates_twice = embeddings
        self.lr = lr
        self.hidden = hidden
        self.input_gradient = input_gradient  # shares its projection and the per-batch gradients
        self.discriminator: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._saved_state: dict[str, Any] | None = None
        #: True when the input-gradient term is off: this signal then trains the shared embedding projection
        self.owns_projection = False

    @classmethod
    def from_config(cls, context: BuildContext) -> "AdversarialGradientSignal":
        input_gradient = _shared_input_gradient(context)
        signal = cls(context.args.input_grad_key, input_gradient.embeddings, context.args.discriminator_lr,
                     input_gradient)
        signal.owns_projection = context.weight(InputGradientSignal.weight_field) == 0
        return signal

    def trainable_modules(self) -> dict[str, nn.Module]:
        projection = self.input_gradient.projection
        return {"embedding_projection": projection} if self.owns_projection and projection is not None else {}

    def _build(self, width: int, device: torch.device) -> None:
        generator_state = torch.get_rng_state()
        torch.manual_seed(width)  # the same discriminator initialisation in every run (and after resume)
        self.discriminator = nn.Sequential(
            nn.Linear(width, self.hidden), nn.LeakyReLU(0.2), nn.Linear(self.hidden, 1)
        ).to(device)
        torch.set_rng_state(generator_state)
        self.optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=self.lr, betas=(0.5, 0.999))
        if self._saved_state is not None:
            self._restore(self._saved_state)
            self._saved_state = None

    def loss_sum(self, view: SignalView) -> torch.Tensor:
        g_student, g_teacher = input_gradients(view, self.key, self.embeddings, self.input_gradient.projection)
        if self.discriminator is None:
            self._build(g_student.shape[-1], g_student.device)
        if view.training:
            self._pending.append((g_teacher.detach().float(), g_student.detach().float()))
        logits = self.discriminator(g_student.float()).squeeze(-1)
        return F.softplus(-logits).sum()

    def after_optimizer_step(self) -> dict[str, float]:
        """One discriminator update on the step's gradients; returns its accuracy before the update."""
        if not self._pending or self.discriminator is None:
            return {}
        real = torch.cat([t for t, _ in self._pending])
        fake = torch.cat([s for _, s in self._pending])
        self._pending = []
        self.optimizer.zero_grad(set_to_none=True)  # drop what the student's loss left on D
        logits_real, logits_fake = self.discriminator(real).squeeze(-1), self.discriminator(fake).squeeze(-1)
        correct = (logits_real > 0).sum() + (logits_fake <= 0).sum()
        accuracy = float(correct) / (len(real) + len(fake))
        loss = F.binary_cross_entropy_with_logits(logits_real, torch.ones_like(logits_real)) + \
            F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake))
        loss.backward()
        average_gradients(list(self.discriminator.parameters()))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"discriminator_accuracy": accuracy}

    def checkpoint_state(self) -> dict[str, Any]:
        if self.discriminator is None:
            return dict(self._saved_state or {})
        return {"discriminator": self.discriminator.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if self.discriminator is None:
            self._saved_state = state  # applied when D is built (its width is known at the first batch)
        else:
            self._restore(state)

    def _restore(self, state: dict[str, Any]) -> None:
        self.discriminator.load_state_dict(state["discriminator"])
        self.optimizer.load_state_dict(state["optimizer"])


def head_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The model's last `nn.Linear` (its head: classifier, lm_head, score, ...), by qualified name."""
    base = unwrap(model)
    linears = [(name, module) for name, module in base.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(
            f"{type(base).__name__} has no nn.Linear head whose input could serve as the feature: set feature_layer to "
            "the name of the submodule whose output is the representation."
        )
    return linears[-1]


def feature_width(model: nn.Module, feature_layer: str | None) -> int | None:
    """Width of the feature: the head's input (default) or a named `nn.Linear`'s output; `None` when unknown."""
    if feature_layer is None:
        return head_linear(model)[1].in_features
    module = unwrap(model).get_submodule(feature_layer)
    return module.out_features if isinstance(module, nn.Linear) else None


class FeatureTap:
    """Context manager capturing a model's feature during a forward: the output of `feature_layer`, or the input of
    the head (last `nn.Linear`). With ``leaf=True`` the captured tensor is replaced by a detached copy that requires
    grad (so a frozen model's gradient with respect to it can be taken)."""

    def __init__(self, model: nn.Module, feature_layer: str | None, leaf: bool = False) -> None:
        self.model, self.feature_layer, self.leaf = unwrap(model), feature_layer, leaf
        self.value: torch.Tensor | None = None
        self._handle = None

    def _take(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.leaf:
            tensor = tensor.detach().requires_grad_(True)
        self.value = tensor
        return tensor

    def __enter__(self) -> "FeatureTap":
        if self.feature_layer is None:
            module = head_linear(self.model)[1]

            def pre_hook(_module, args):
                return (self._take(args[0]), *args[1:])

            self._handle = module.register_forward_pre_hook(pre_hook)
        else:
            module = self.model.get_submodule(self.feature_layer)

            def hook(_module, _args, output):
                if isinstance(output, tuple):
                    return (self._take(output[0]), *output[1:])
                return self._take(output)

            self._handle = module.register_forward_hook(hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()


@register_signal
class FeatureGradientSignal(_GradientSignal):
    """Feature-gradient matching: ``sum over rows of mean over features (g_t - P(g_s))^2`` with g the gradient of
    the summed per-example task loss with respect to the feature (the head's input by default), one row per counted
    position (or per example), P a learned projection where widths differ."""

    name = "feature_grad"
    weight_field = "feature_grad_weight"
    build_order = 60
    option_fields = ("feature_layer",)

    def __init__(self, feature_layer: str | None, student_width: int | None, teacher_width: int | None) -> None:
        self.feature_layer = feature_layer
        # a feature inside the layer stack is differentiated through later attention layers, twice
        self.differentiates_twice = feature_layer is not None
        self.projection = (
            nn.Linear(student_width, teacher_width)
            if student_width and teacher_width and student_width != teacher_width
            else None
        )

    @classmethod
    def from_config(cls, context: BuildContext) -> "FeatureGradientSignal":
        layer = context.args.feature_layer
        return cls(layer, feature_width(context.student, layer), feature_width(context.teacher, layer))

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"gradient_projection": self.projection} if self.projection is not None else {}

    def _rows(self, gradient: torch.Tensor, view: SignalView) -> torch.Tensor:
        if gradient.dim() == 3 and gradient.shape[:2] == view.mask.shape:
            return gradient[view.mask]  # token-level head: counted positions
        return gradient.reshape(gradient.shape[0], -1)

    def loss_sum(self, view: SignalView) -> torch.Tensor:
        student, teacher = unwrap(view.student_model), unwrap(view.teacher_model)
        drop = tuple(view.label_names)
        with torch.enable_grad():
            with FeatureTap(teacher, self.feature_layer, leaf=True) as tap:
                outputs = teacher(**model_inputs(teacher, view.inputs, drop=drop))
            (g_teacher,) = torch.autograd.grad(_task_sum(outputs, view), tap.value)
            with FeatureTap(student, self.feature_layer) as tap:
                outputs = student(**model_inputs(student, view.inputs, drop=drop))
            (g_student,) = torch.autograd.grad(_task_sum(outputs, view), tap.value, create_graph=view.training)
        g_student, g_teacher = self._rows(g_student, view), self._rows(g_teacher, view).detach()
        if self.projection is not None:
            g_student = self.projection(g_student)
        if g_student.shape != g_teacher.shape:
            raise ValueError(
                f"Student feature gradients {tuple(g_student.shape)} and teacher ones {tuple(g_teacher.shape)} differ "
                "in shape and no projection could be sized from the configs: point feature_layer at an nn.Linear, or "
                "use features of equal width."
            )
        return (g_teacher.float() - g_student.float()).pow(2).mean(dim=-1).sum()
