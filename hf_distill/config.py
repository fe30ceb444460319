"""`DistillationConfig`: every distillation knob, documented and validated, on top of `TrainingArguments`."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .checks.options import SAMPLERS, check_choice, check_finite_settings, check_sampling_settings, parse_chunk_size
from .kernels.linear_backward import BACKWARD_DTYPES as LINEAR_BACKWARD_DTYPES
from .signals import registered_signals, signal_weight_fields
from .signals.hidden import HIDDEN_LOSSES, HIDDEN_PROJECTIONS
from .signals.logits import LOGITS_LOSSES

ENSEMBLE_MODES = ("mean_probs", "mean_logits")

TEACHER_DTYPES = ("auto", "float32", "float16", "bfloat16")
OUTPUT_LAYER_DTYPES = ("bfloat16", "float16")
#: How the chunked output terms are computed: our closed-form chunks, or Liger's fused kernel (`hf_distill.kernels.liger`).
OUTPUT_KERNELS = ("chunked", "compiled", "liger")
VOCAB_MISMATCH_MODES = ("error", "truncate")
#: What a training step whose loss or gradient norm is not finite does (`on_nonfinite`).
NONFINITE_MODES = ("error", "skip_step")


@dataclass
class DistillationConfig(TrainingArguments):
    """Training arguments for [`DistillationTrainer`]: all of `TrainingArguments`, plus the distillation knobs.

    The student minimises ``L = task_weight * L_task + logits_weight * L_logits + hidden_weight * L_hidden +
    attention_weight * L_attention``, where ``L_task`` is its own supervised loss on the labels and the other terms
    compare it with the frozen teacher. The task and logits terms are means over the positions that count (examples
    for classification / regression, tokens whose label is not -100 for language models); the hidden and attention
    terms are means over the tokens the attention mask keeps. Each term is logged as ``<term>_loss``.

    Args:
        temperature (`float`, defaults to 2.0):
            Softmax temperature T > 0 applied to teacher and student logits before comparing them
            (Hinton et al. 2015: ``p = softmax(z / T)``). Ignored by ``logits_loss="mse"``.
        task_weight (`float`, defaults to 0.5):
            Weight of the student's own task loss (cross-entropy on labels, MSE for a single regression output, or the
            loss the student model returns). 0 turns it off, and then no labels are needed.
        logits_weight (`float`, defaults to 0.5):
            Weight of the teacher-student output divergence chosen by `logits_loss`. 0 turns it off.
        logits_loss (`str`, defaults to `"forward_kl"`):
            How student outputs are compared with the teacher's, per counted position:
            `"forward_kl"` KL(p_t || p_s) (Hinton); `"reverse_kl"` KL(p_s || p_t); `"jsd"` the generalized
            Jensen-Shannon divergence of GKD (Agarwal et al. 2024, eq. 1) with `jsd_beta`; `"tvd"` total variation
            0.5 * sum |p_t - p_s|; `"mse"` mean squared error of the raw outputs (Bucilua et al. 2006; for a regression
            student the "high-precision" term ||y_t - y_s||^2). For a teacher with another tokenizer
            (`DistillationTrainer(teacher_processing_class=...)`), over aligned spans: `"uld"` the sorted-probability
            distance of ULD (Boizard et al. 2024), `"hybrid"` GOLD's mix of a JSD over the tokens both vocabularies
            spell alike and ULD over the rest (`hf_distill.signals.cross_vocab`); with one vocabulary they compare
            each position the same way.
        hybrid_matched_weight (`float`, *optional*):
            `"hybrid"`: the weight w of the matched tokens' JSD (the rest gets 1 - w); None: w = matched / V_teacher,
            as TRL's GOLD.
        align_tokenizers (`str`, defaults to `"auto"`):
            `"auto"` aligns the teacher's tokens with the student's when `teacher_processing_class` has another
            vocabulary; `"always"` aligns even when they share one (the cross-tokenizer path on one tokenizer).
        jsd_beta (`float`, defaults to 0.5):
            Interpolation of the generalized JSD, in [0, 1]: 0 gives forward KL, 1 reverse KL (same convention as
            TRL's `GKDTrainer.generalized_jsd_loss`). Only used with `logits_loss="jsd"`. On the command line and in
            recipes also `--beta` / ``beta:``, TRL's `GKDConfig` name.
        scale_by_temperature_squared (`bool`, defaults to `True`):
            Multiply the soft (temperature-dependent) term by T^2 so its gradients keep their scale across
            temperatures (Hinton et al. 2015). `"mse"` ignores T and is never scaled.
        teacher_dtype (`str`, *optional*):
            Cast the teacher to this dtype (`"float32"`, `"float16"`, `"bfloat16"`) before training; `None` or
            `"auto"` keeps the teacher as it was loaded. Teacher logits are compared in float32 either way.
        output_layer_dtype (`str`, *optional*):
            The chunked output loss's matmuls in this dtype (`"bfloat16"`, `"float16"`) even where the models run in
            float32: ``z = h.bf16 @ W.bf16^T`` for the student's and the teacher's output layers, and the gradient
            products ``dL/dh = g.bf16 @ W.bf16``, ``dL/dW = sum_chunks g.bf16^T @ h.bf16``; the softmax, log-sum-exp,
            loss and the accumulation of dL/dW stay in float32. The decoder keeps its own precision. `None`: the
            precision of the forward (autocast's when it is on). Only the chunked path (`logits_chunk_size` != 0).
            The command line sets `"bfloat16"` where bf16 is fast (`performance.recommended_output_layer_dtype`;
            held-out loss +0.13% vs float32 after 60 steps); the Python API leaves it None.
        linear_backward_dtype (`str`, *optional*):
            The backward products of the student's float32 `nn.Linear` layers (its output layer aside) in this dtype
            (`"bfloat16"`), their forward in float32: ``y = x W^T + b`` as before, ``dL/dx = bf16(g) @ bf16(W)``,
            ``dL/dW = bf16(g)^T @ bf16(x)`` (float32 accumulation), ``dL/db = sum g``; only a bf16 copy of ``x`` is
            kept for the backward. One step's gradient moves about 1% from float32's, against 16-25% for a bf16
            forward (`--bf16`). Not with `--bf16` / `--fp16`, a signal that differentiates the student twice, DeepSpeed
            or FSDP. The command line sets `"bfloat16"` where bf16 is fast
            (`performance.recommended_linear_backward_dtype`); the Python API leaves it None.
        output_kernel (`str`, defaults to `"chunked"`):
            The chunked output terms of training steps: `"chunked"` (ours, closed-form gradients per chunk),
            `"compiled"` (that closed form as one `torch.compile` kernel, 2.1-2.8x faster per chunk on a CPU; a C++
            compiler on CPU, Triton on GPU; without a closed form as `"chunked"`; the command line picks it) or
            `"liger"` (Liger's `LigerFusedLinearJSDLoss`, compiled on CUDA; needs `liger-kernel`, a `jsd` /
            `forward_kl` / `reverse_kl` logits loss, one live teacher and the chunked path). All compute
            ``c_task * sum CE + c_logits * T^2 * sum D``; they agree within float tolerance.
        compile_student_layers (`bool`, defaults to `False`):
            Each decoder layer of the student through `torch.compile` in training steps (regional compilation: one
            graph for every layer of a class, seconds to build; evaluation and generation stay eager; the model is
            plain after `train()`). Fuses the layers' element-wise work: 1.10x the SmolLM2 student's tokens/s, the
            same values to float tolerance. Not with `torch_compile`, signals that differentiate the student twice,
            DeepSpeed or FSDP; needs a C++ compiler (CPU) or Triton (GPU). The command line turns it on where it can
            run (`performance.recommended_compile_student_layers`); the Python API leaves it off.
        vocab_mismatch (`str`, defaults to `"error"`):
            What to do when teacher and student output sizes differ. `"error"` raises before training. `"truncate"`
            (language models only) compares the shared ids ``[0, min(V_t, V_s))``, for families whose config vocabulary
            is padded past the tokenizer (Qwen); the tokenizers must agree on those ids.
        hidden_weight (`float`, defaults to 0.0):
            Weight of hidden-state matching through `layer_map` (FitNets' hints, DistilBERT's cosine term). 0 turns it
            off, and then no hidden states are computed.
        hidden_loss (`str`, defaults to `"cosine"`):
            `"cosine"`: mean over counted tokens of 1 - cos(h_s, h_t); `"mse"`: mean over counted tokens and features of
            (h_s - h_t)^2. Averaged over the mapped layer pairs.
        hidden_span_pooling (`str`, *optional*):
            A teacher with another tokenizer: `"mean"` matches each aligned span's mean hidden state on both sides
            (weighted by the span's student tokens); None refuses hidden-state matching across tokenizers.
        layer_map (`str` or list of pairs, defaults to `"auto"`):
            Which student hidden states match which teacher ones (`hidden_states` indices, 0 = embeddings). `"auto"`:
            student i+1 <-> teacher ``distilled_from_layers[i] + 1`` for a student made by `shrink_model`, else evenly
            spaced (student i <-> teacher round(i * T / S)); `"last"`: the last hidden states only; or explicit pairs
            ``[[1, 2], [2, 4]]`` (also as the strings ``"[[1, 2], [2, 4]]"`` or ``"1:2,2:4"``). The attention signal
            uses the same map (pair (s, t) -> attention layers s - 1 and t - 1).
        hidden_projection (`str`, defaults to `"auto"`):
            `"auto"`: a learned linear projection per mapped pair (FitNets' f_w) only when the widths differ;
            `"linear"`: always. Projections train with the student's optimizer, are saved in checkpoints, and are never
            part of the exported student.
        attention_weight (`float`, defaults to 0.0):
            Weight of attention-distribution matching (MiniLM / TinyBERT): KL(A_t || A_s) per counted query token,
            averaged over heads (over the head-averaged maps when head counts differ) and mapped layers. Needs eager
            attention (both models are switched to it, with a warning) and a student without attention dropout.
        input_grad_weight (`float`, defaults to 0.0):
            Sobolev training (Czarnecki et al. 2017): ``mean over elements of (g_t - g_s)^2`` where g is the gradient of
            the summed per-example task loss (against the labels) with respect to the input, for teacher and student.
            The input is `input_grad_key` for continuous models, the teacher's input embeddings (fed to both, counted
            tokens only, projected where widths differ) for token models. Costs extra backward passes only when > 0.
        input_grad_key (`str`, *optional*):
            Batch key of the float input to differentiate (default: the only float input other than the labels).
        adversarial_grad_weight (`float`, defaults to 0.0):
            GREAT (Sinha et al. 2018): a discriminator D learns to tell teacher input gradients from student ones
            (binary cross-entropy, its own Adam optimizer); the student term is ``-log D(g_s)``. Logs
            `discriminator_accuracy`; D and its optimizer are checkpointed, never exported.
        discriminator_lr (`float`, defaults to 1e-3):
            Learning rate of GREAT's discriminator.
        feature_grad_weight (`float`, defaults to 0.0):
            Like `input_grad_weight`, with respect to an intermediate representation: the output of `feature_layer`,
            by default the input of the head (the model's last `nn.Linear`), projected where widths differ.
        feature_layer (`str`, *optional*):
            Name of the submodule (``model.get_submodule(name)``) whose output is the representation used by
            `feature_grad_weight` and, for plain modules, `similarity_weight`. Default: the input of the last
            `nn.Linear`.
        similarity_weight (`float`, defaults to 0.0):
            Similarity-preserving KD (Tung & Mori 2019): ``||G_s - G_t||_F^2 / b^2`` with G = F F^T row-L2-normalised,
            F one vector per example (token models: the mean over counted tokens of the last hidden state; plain
            modules: the flattened `feature_layer` output). Works across widths.
        teacher_route (`list[str]`, *optional*):
            Route-constrained optimisation (Jin et al. 2019): teacher checkpoints, earliest first, used instead of
            `teacher_model`; anchor k teaches for its share of the steps, one anchor in memory at a time.
        route_steps (`list[int]`, *optional*):
            The global steps at which anchors 2, 3, ... take over (len(teacher_route) - 1 increasing values). Default:
            equal shares of the run's steps.
        ensemble (`str`, defaults to `"mean_probs"`):
            With a list of teachers: soft targets are the mean of their temperature-softened probabilities
            (`"mean_probs"`) or of their logits (`"mean_logits"`; also what `logits_loss="mse"` always uses). Other
            signals read the first teacher.
        logits_chunk_size (`int` or `"auto"`, defaults to `"auto"`):
            Causal LMs: compute the logits term and the task cross-entropy from the final hidden states and the output
            layer, this many counted tokens at a time, so no full ``[tokens, vocab]`` logits tensor exists (same loss
            and gradients as the plain path). `"auto"`: chunks of ``2**24 // vocab`` tokens where the models allow it
            (transformers causal LMs with a plain `lm_head`, every other active signal reading no logits), the plain
            path otherwise; an integer > 0 insists (an error says why it cannot); 0: always the plain full-logits path.
        on_nonfinite (`str`, defaults to `"error"`):
            A training step whose loss, one of its terms or its gradient norm is NaN or infinite: `"error"` stops the
            run at that step, before the optimizer moves the student, with an error naming the step and the terms
            that went non-finite (under data parallelism every process stops at the same step); `"skip_step"` drops
            that step's update (the optimizer sees no gradients; logged as `skipped_steps`) and trains on.
        lmbda (`float`, defaults to 0.0):
            On-policy distillation (GKD, Agarwal et al. 2024): the share of training micro-batches whose completions the
            student samples itself (from each row's prompt: the tokens before its first counted label) before the
            teacher scores them. 0: off-policy (the dataset's completions); 1: always on-policy (the Qwen3 / Thinking
            Machines recipe). Which micro-batches are sampled is drawn from (seed, step, micro-batch), the same on every
            process and after a resume. TRL's `GKDConfig.lmbda` means the same, with default 0.5. Recommended with it:
            ``logits_loss="reverse_kl"`` (MiniLLM, Gu et al. 2024; Thinking Machines 2025) or ``"jsd"`` with `jsd_beta`
            (GKD), at ``temperature=1``; or ``"sampled_token"``.
        seq_kd (`bool`, defaults to `False`):
            Sequence-level KD (Kim & Rush 2016) on the fly: the micro-batches the student does not sample get
            completions sampled from the teacher (the first one of an ensemble; the adapter-free base model in
            self-distillation) instead of the dataset's, as TRL's `GKDConfig.seq_kd`. For a fixed set, generate once
            with `hf-distill generate`.
        max_new_tokens (`int`, defaults to 128):
            Most tokens sampled per completion (TRL's `GKDConfig.max_new_tokens`). The prompt plus this must fit the
            model's context.
        generation_temperature (`float`, defaults to 1.0):
            Sampling temperature of the completions (0: greedy). TRL's GKD uses its one `temperature` (0.9) for both
            sampling and the loss; here the loss keeps `temperature` and sampling has its own (1.0: the student's own
            distribution, which the on-policy estimators assume).
        top_p (`float`, defaults to 1.0):
            Nucleus sampling of the completions (1.0: off).
        top_k (`int`, defaults to 0):
            Top-k sampling of the completions (0: off, as TRL's GKD and `DistillationConfig`).
        num_generations (`int`, defaults to 1):
            Completions sampled per prompt on a sampled micro-batch (it then holds ``rows * num_generations``
            sequences; all count). As TRL's `DistillationConfig.num_generations`.
        sampler (`str`, defaults to `"auto"`):
            What draws the completions: `"decode"` (our decode loop, `data.sampler`: 1.5-3x `generate`'s tokens/s on a
            CPU, the same distribution), `"generate"` (`model.generate`), `"auto"` (the decode loop on a CPU).
        sample_prompts (`int`, defaults to 4), sample_max_new_tokens (`int`, defaults to 48):
            Causal LMs: at each evaluation and at the end of training, the teacher's and the student's greedy answers
            to this many held-out prompts, side by side in the log, the reporting integrations and the report
            (`samples.SamplesCallback`; 0: off).
        on_collapse (`str`, defaults to `"warn"`):
            When the student's samples (on-policy, per logging interval; the held-out samples, against the
            teacher's) degenerate by the thresholds of `samples.collapse_reasons`: `"warn"`, or `"error"` to stop.
        overwrite_output_dir (`bool`, defaults to `False`):
            A run refuses an `output_dir` that holds an earlier run's checkpoints (the command line: anything at all)
            unless it resumes from it. `True` moves the earlier contents aside into a dated folder beside it
            (``<output_dir>.before-YYYYmmdd-HHMMSS``), so nothing is destroyed and no stale file sits beside the
            new student.
        resume_with_changes (`bool`, defaults to `False`):
            Resuming compares the checkpoint's record (loss, temperature, weights, training rows, student shape;
            `provenance.check_resume`) with this run's and refuses any difference, naming each; `True` resumes
            anyway and logs them.
    """

    temperature: float = field(
        default=2.0, metadata={"help": "Softmax temperature T > 0 applied to teacher and student logits."}
    )
    task_weight: float = field(
        default=0.5, metadata={"help": "Weight of the student's own task loss on the labels (0 turns it off)."}
    )
    logits_weight: float = field(
        default=0.5, metadata={"help": "Weight of the teacher-student output divergence (0 turns it off)."}
    )
    logits_loss: str = field(
        default="forward_kl",
        metadata={"help": "Output divergence.", "choices": list(LOGITS_LOSSES)},
    )
    hybrid_matched_weight: float | None = field(
        default=None, metadata={"help": "logits_loss='hybrid': weight of the matched tokens (None: matched / V_t)."}
    )
    align_tokenizers: str = field(
        default="auto",
        metadata={"help": "Cross-tokenizer alignment: 'auto' (when vocabularies differ) or 'always'.",
                  "choices": ["auto", "always"]},
    )
    jsd_beta: float = field(
        default=0.5, metadata={"help": "Generalized JSD interpolation in [0, 1]: 0 = forward KL, 1 = reverse KL "
                                       "(--beta, TRL's name, is the same flag).", "aliases": ["--beta"]}
    )
    scale_by_temperature_squared: bool = field(
        default=True, metadata={"help": "Multiply the soft term by T^2 (Hinton) so gradient scale is kept across T."}
    )
    teacher_dtype: str | None = field(
        default=None,
        metadata={"help": "Cast the teacher to this dtype; None/'auto' keeps it.", "choices": list(TEACHER_DTYPES)},
    )
    output_layer_dtype: str | None = field(
        default=None,
        metadata={"help": "The chunked output loss's matmuls in this dtype (fp32 softmax and accumulation); None: the "
                          "forward's.", "choices": list(OUTPUT_LAYER_DTYPES)},
    )
    linear_backward_dtype: str | None = field(
        default=None,
        metadata={"help": "The backward products of the student's linear layers in this dtype (forward float32); "
                          "None: the forward's.", "choices": list(LINEAR_BACKWARD_DTYPES)},
    )
    output_kernel: str = field(
        default="chunked",
        metadata={"help": "The chunked output terms: ours ('chunked'), compiled ('compiled') or Liger's ('liger').",
                  "choices": list(OUTPUT_KERNELS)},
    )
    compile_student_layers: bool = field(
        default=False, metadata={"help": "torch.compile each decoder layer of the student in training steps (one "
                                         "graph for all; evaluation and generation stay eager)."},
    )
    vocab_mismatch: str = field(
        default="error",
        metadata={
            "help": "Teacher/student output sizes differ: 'error', or 'truncate' to the shared ids (language models).",
            "choices": list(VOCAB_MISMATCH_MODES),
        },
    )

    hidden_weight: float = field(
        default=0.0, metadata={"help": "Weight of hidden-state matching through layer_map (0 turns it off)."}
    )
    hidden_loss: str = field(
        default="cosine", metadata={"help": "Hidden-state distance.", "choices": list(HIDDEN_LOSSES)}
    )
    hidden_span_pooling: str | None = field(
        default=None,
        metadata={"help": "A teacher with another tokenizer: match hidden states as means over aligned spans ('mean').",
                  "choices": ["mean"]},
    )
    layer_map: str | list[list[int]] = field(
        default="auto",
        metadata={"help": "'auto', 'last', or student:teacher hidden_states index pairs, e.g. '1:2,2:4' or '[[1,2],[2,4]]'."},
    )
    hidden_projection: str = field(
        default="auto",
        metadata={"help": "Learned linear projections: 'auto' (only when widths differ) or 'linear' (always).",
                  "choices": list(HIDDEN_PROJECTIONS)},
    )
    attention_weight: float = field(
        default=0.0, metadata={"help": "Weight of attention-map KL on mapped layers (0 turns it off; eager attention)."}
    )

    input_grad_weight: float = field(
        default=0.0, metadata={"help": "Weight of input-gradient matching (Sobolev training); 0 turns it off."}
    )
    input_grad_key: str | None = field(
        default=None, metadata={"help": "Batch key of the float input to differentiate (default: the only one)."}
    )
    adversarial_grad_weight: float = field(
        default=0.0, metadata={"help": "Weight of GREAT's adversarial gradient term -log D(g_s); 0 turns it off."}
    )
    discriminator_lr: float = field(default=1e-3, metadata={"help": "Learning rate of GREAT's discriminator."})
    feature_grad_weight: float = field(
        default=0.0, metadata={"help": "Weight of feature-gradient matching (w.r.t. the head's input); 0 turns it off."}
    )
    feature_layer: str | None = field(
        default=None, metadata={"help": "Submodule whose output is the feature (default: the head's input)."}
    )
    similarity_weight: float = field(
        default=0.0, metadata={"help": "Weight of similarity-preserving KD (Tung & Mori); 0 turns it off."}
    )
    teacher_route: list[str] | None = field(
        default=None, metadata={"help": "Route-constrained optimisation: teacher checkpoints, earliest first."}
    )
    route_steps: list[int] | None = field(
        default=None, metadata={"help": "Global steps at which route anchors 2, 3, ... take over (default: equal)."}
    )
    ensemble: str = field(
        default="mean_probs",
        metadata={"help": "How a list of teachers is combined.", "choices": list(ENSEMBLE_MODES)},
    )

    logits_chunk_size: int | str = field(
        default="auto",
        metadata={"help": "Causal LMs: tokens per chunk of the chunked logits/CE loss; 'auto', or 0 for full logits."},
    )

    lmbda: float = field(
        default=0.0, metadata={"help": "On-policy distillation: share of micro-batches the student completes itself "
                                       "(GKD's lambda; 0: off-policy, 1: always on-policy)."}
    )
    seq_kd: bool = field(
        default=False, metadata={"help": "Micro-batches the student does not sample get teacher-sampled completions."}
    )
    max_new_tokens: int = field(default=128, metadata={"help": "Most tokens sampled per completion (lmbda / seq_kd)."})
    generation_temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature of on-policy / seq_kd completions (0: greedy)."}
    )
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling of the completions (1.0: off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling of the completions (0: off)."})
    num_generations: int = field(default=1, metadata={"help": "Completions sampled per prompt on a sampled batch."})
    sampler: str = field(default="auto", metadata={"help": "What samples completions: 'decode' (our loop), 'generate' "
                                                           "or 'auto' (decode on a CPU).",
                                                   "choices": list(SAMPLERS)})

    sample_prompts: int = field(default=4, metadata={"help": "Held-out prompts answered greedily by teacher and student "
                                                             "at each evaluation and at the end (0: off)."})
    sample_max_new_tokens: int = field(default=48, metadata={"help": "Most new tokens of those held-out samples."})
    on_collapse: str = field(default="warn", metadata={"help": "Degenerate student samples: 'warn' or 'error' (stop).",
                                                       "choices": ["warn", "error"]})
    on_nonfinite: str = field(
        default="error",
        metadata={"help": "A step with a NaN/inf loss or gradient norm: 'error' stops the run there, 'skip_step' "
                          "drops its update.", "choices": list(NONFINITE_MODES)},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Move an earlier run found in output_dir aside into a dated folder beside it (otherwise "
                          "such a folder is refused unless resumed)."},
    )
    resume_with_changes: bool = field(
        default=False,
        metadata={"help": "Resume a checkpoint although this run's loss, temperature, weights, data or student differ "
                          "from the run that wrote it (otherwise refused, naming each difference)."},
    )

    def __post_init__(self) -> None:
        check_finite_settings(self)
        super().__post_init__()
        self.validate_distillation()

    @property
    def loss_weights(self) -> dict[str, float]:
        """The weight of every term of the combined loss, by field name (the task's and every registered signal's
        these settings have)."""
        return {name: float(getattr(self, name)) for name in ("task_weight", *signal_weight_fields(self))}

    def validate_distillation(self) -> None:
        """Raise a `ValueError` naming the field and the fix for every inconsistent distillation setting."""
        if not self.temperature > 0:
            raise ValueError(
                f"temperature must be > 0 (softmax(z / T) is undefined otherwise), got {self.temperature}. "
                "Use 1.0 for unsoftened distributions; Hinton et al. use 2-20."
            )
        weights = self.loss_weights
        negative = {k: v for k, v in weights.items() if v < 0}
        if negative:
            raise ValueError(
                f"Loss weights must be >= 0, got {negative}. Set a weight to 0 to turn its term off."
            )
        if all(v == 0 for v in weights.values()):
            raise ValueError(
                f"All loss weights are zero ({weights}): there is nothing to train on. Set at least one of "
                f"{', '.join(weights)} > 0."
            )
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise ValueError(
                f"jsd_beta must lie in [0, 1] (0 = forward KL, 1 = reverse KL), got {self.jsd_beta}."
            )
        for signal_class in registered_signals():
            signal_class.check_options(self)
        check_choice("teacher_dtype", self.teacher_dtype, TEACHER_DTYPES, allow_none=True)
        check_choice("output_layer_dtype", self.output_layer_dtype, OUTPUT_LAYER_DTYPES, allow_none=True)
        check_choice("output_kernel", self.output_kernel, OUTPUT_KERNELS)
        check_choice("linear_backward_dtype", self.linear_backward_dtype, LINEAR_BACKWARD_DTYPES, allow_none=True)
        if self.linear_backward_dtype is not None and (self.bf16 or self.fp16):
            raise ValueError(
                f"linear_backward_dtype={self.linear_backward_dtype!r} with --{'bf16' if self.bf16 else 'fp16'}: "
                "mixed precision already runs the linear layers' forward and backward in half precision. Drop one "
                "of them (linear_backward_dtype keeps the forward in float32)."
            )
        if not self.discriminator_lr > 0:
            raise ValueError(f"discriminator_lr must be > 0, got {self.discriminator_lr}.")
        check_choice("ensemble", self.ensemble, ENSEMBLE_MODES)
        if self.route_steps is not None:
            if not self.teacher_route:
                raise ValueError("route_steps is set but teacher_route is not: give the route's checkpoints too.")
            steps = list(self.route_steps)
            if len(steps) != len(self.teacher_route) - 1 or any(b <= a for a, b in zip([0, *steps], steps)):
                raise ValueError(
                    f"route_steps={steps} must hold len(teacher_route) - 1 = {len(self.teacher_route) - 1} strictly "
                    "increasing positive global steps: the steps at which anchors 2, 3, ... take over."
                )
        check_sampling_settings(self)
        self.logits_chunk_size = parse_chunk_size(self.logits_chunk_size)
        check_choice("on_nonfinite", self.on_nonfinite, NONFINITE_MODES)
        check_choice("on_collapse", self.on_collapse, ("warn", "error"))
        if self.sample_prompts < 0 or self.sample_max_new_tokens < 1:
            raise ValueError(f"sample_prompts must be >= 0 (0: off) and sample_max_new_tokens >= 1, got "
                             f"{self.sample_prompts} and {self.sample_max_new_tokens}.")
        check_choice("vocab_mismatch", self.vocab_mismatch, VOCAB_MISMATCH_MODES)
        check_choice("align_tokenizers", self.align_tokenizers, ("auto", "always"))
        check_choice("hidden_span_pooling", self.hidden_span_pooling, ("mean",), allow_none=True)
        if self.hybrid_matched_weight is not None and not 0 <= self.hybrid_matched_weight <= 1:
            raise ValueError(f"hybrid_matched_weight={self.hybrid_matched_weight} must lie in [0, 1] (or be None: "
                             "matched / V_teacher).")

