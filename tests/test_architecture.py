"""The extension points: a signal of your own (registered from outside the package) and a teacher source that makes
the sequences of each batch; plus the shape of the package (no import cycle, file sizes)."""

from __future__ import annotations

import ast
import copy
import os
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F

from hf_distill import DistillationConfig, DistillationTrainer
from hf_distill.signals import Signal, register_signal, unregister_signal
from hf_distill.storage.hub import CardInfo, model_card
from hf_distill.teachers import TeacherLogits, TeacherOutputs, TeacherSource

from .conftest import MLP, lm_dataset, tiny_llama

PACKAGE = Path(__file__).resolve().parents[1] / "hf_distill"


# ---- a signal defined here, registered through the public extension point -------------------------------------------


class ProbabilityL1Signal(Signal):
    """sum over counted positions of sum_v |softmax(z_s / T) - softmax(z_t / T)| (a test-only signal), with a learned
    scalar gain (a trainable module) and a call counter (its checkpoint state)."""

    name = "prob_l1"
    weight_field = "prob_l1_weight"
    option_fields = ("prob_l1_temperature",)

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.gain = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.ones_(self.gain.weight)
        self.calls = 0

    @classmethod
    def from_config(cls, context):
        return cls(context.args.prob_l1_temperature)

    def trainable_modules(self):
        return {"gain": self.gain}

    def checkpoint_state(self):
        return {"calls": self.calls}

    def load_checkpoint_state(self, state):
        self.calls = state["calls"]

    def loss_sum(self, view):
        self.calls += 1
        student, teacher = view.counted_logits()
        p_s = torch.softmax(student.float() / self.temperature, dim=-1)
        p_t = torch.softmax(teacher.float() / self.temperature, dim=-1)
        return self.gain.weight.reshape(()) * (p_s - p_t).abs().sum()


@dataclass
class L1Config(DistillationConfig):
    prob_l1_weight: float = field(default=0.0, metadata={"help": "Weight of the test's probability-L1 signal."})
    prob_l1_temperature: float = field(default=1.0, metadata={"help": "Its temperature."})


@pytest.fixture
def registered():
    register_signal(ProbabilityL1Signal)
    yield ProbabilityL1Signal
    unregister_signal(ProbabilityL1Signal)


def _float_data(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return datasets.Dataset.from_dict({"x": x.tolist(), "labels": torch.randint(0, 4, (n,), generator=g).tolist()})


def _l1_args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no", max_steps=1,
                  logging_steps=1, per_device_train_batch_size=12, disable_tqdm=True, seed=0, learning_rate=0.1,
                  task_weight=0.0, logits_weight=0.0, prob_l1_weight=0.3, prob_l1_temperature=2.0)
    values.update(overrides)
    return L1Config(**values)


def test_a_registered_signal_trains_logs_its_hand_computed_loss_and_counts_in_the_checks(tmp_path, registered):
    teacher, student = MLP(seed=0), MLP(seed=1)
    data = _float_data()
    initial = copy.deepcopy(student)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=_l1_args(tmp_path), train_dataset=data)
    assert [signal.name for signal, _ in trainer.signals] == ["prob_l1"]
    trainer.train()
    logged = next(entry for entry in trainer.state.log_history if "prob_l1_loss" in entry)

    x = torch.tensor(data["x"])
    with torch.no_grad():
        p_s = torch.softmax(initial(x) / 2.0, dim=-1)
        p_t = torch.softmax(teacher(x) / 2.0, dim=-1)
    by_hand = (p_s - p_t).abs().sum(dim=-1).mean().item()  # gain 1 at step 0; mean over the 12 examples
    assert logged["prob_l1_loss"] == pytest.approx(by_hand, rel=1e-5)
    assert logged["loss"] == pytest.approx(0.3 * by_hand, rel=1e-5)
    assert not torch.equal(trainer.signal_modules["prob_l1__gain"].weight, torch.ones(1, 1))  # it trained

    # the weight checks iterate the registry: this signal alone is enough, and it is named when all are zero
    assert _l1_args(tmp_path).loss_weights["prob_l1_weight"] == 0.3
    with pytest.raises(ValueError, match="All loss weights are zero.*prob_l1_weight"):
        _l1_args(tmp_path, prob_l1_weight=0.0)
    with pytest.raises(ValueError, match="prob_l1_weight=0.3 compares the student with a teacher"):
        DistillationTrainer(model=MLP(seed=1), args=_l1_args(tmp_path), train_dataset=data)
    # listed in the model card like a built-in term
    card = model_card(CardInfo(teacher="t", loss_weights=trainer.args.loss_weights))
    assert "0.3 * prob_l1" in card
    # no file of the package names it
    for path in PACKAGE.rglob("*.py"):
        assert "prob_l1" not in path.read_text() and "ProbabilityL1" not in path.read_text(), path


def test_a_registered_signal_is_checkpointed_and_restored(tmp_path, registered):
    teacher, data = MLP(seed=0), _float_data()

    def run(folder, steps, **overrides):
        args = _l1_args(tmp_path / folder, max_steps=steps, lr_scheduler_type="constant", **overrides)
        trainer = DistillationTrainer(model=MLP(seed=1), teacher_model=teacher, args=args, train_dataset=data)
        return trainer, args

    straight, _ = run("straight", 3)
    straight.train()
    first, args = run("resumed", 2, save_strategy="steps", save_steps=2)
    first.train()
    assert os.path.isfile(os.path.join(args.output_dir, "checkpoint-2", "hf_distill_signal_state.pt"))
    second, _ = run("resumed", 3, overwrite_output_dir=False)
    second.train(resume_from_checkpoint=os.path.join(args.output_dir, "checkpoint-2"))
    signal, reference = second.signals[0][0], straight.signals[0][0]
    assert signal.calls == reference.calls == 3  # 2 restored from the checkpoint + 1
    assert torch.allclose(signal.gain.weight, reference.gain.weight, atol=1e-6)
    assert not torch.equal(signal.gain.weight, torch.ones(1, 1))


# ---- a teacher source that makes each batch's sequences ------------------------------------------------------------


class ReversingSource(TeacherSource):
    """Rewrites each training batch (reverses every row's completion, the labelled tokens, and stops counting its
    last token) and supplies the teacher's outputs for the rewritten batch."""

    def __init__(self, teacher):
        self.teacher = teacher.eval().requires_grad_(False)
        self.rewritten: list[dict[str, torch.Tensor]] = []

    @property
    def models(self):
        return [self.teacher]

    def prepare_batch(self, batch, student, step=(0, 0)):
        ids, labels = batch["input_ids"].clone(), batch["labels"].clone()
        for row in range(ids.shape[0]):
            where = (labels[row] != -100).nonzero().flatten()
            ids[row, where] = ids[row, where.flip(0)]
            labels[row, where] = ids[row, where]
            labels[row, where[-1]] = -100  # the rewritten completion is one token shorter
        rewritten = {**batch, "input_ids": ids, "labels": labels}
        self.rewritten.append(rewritten)
        return rewritten

    def outputs(self, inputs, request):
        assert any(torch.equal(inputs["input_ids"].cpu(), b["input_ids"]) for b in self.rewritten)
        with torch.no_grad():
            outputs = self.teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        return TeacherOutputs(TeacherLogits(outputs.logits), outputs=outputs, model=self.teacher)


def test_a_source_that_rewrites_batches_is_trained_on_the_rewrite_with_counts_following_it(make_args):
    data = lm_dataset(n=6)
    teacher, student = tiny_llama(seed=0), tiny_llama(seed=1)
    initial = copy.deepcopy(student)
    source = ReversingSource(teacher)
    args = make_args(max_steps=1, per_device_train_batch_size=6, temperature=2.0, task_weight=0.5, logits_weight=0.5,
                     logits_chunk_size=0)
    trainer = DistillationTrainer(model=student, teacher_source=source, args=args, train_dataset=data)
    trainer.train()
    logged = next(entry for entry in trainer.state.log_history if "logits_loss" in entry)

    batch = source.rewritten[0]
    original = {k: torch.tensor(data[k]) for k in data.column_names}
    assert not torch.equal(batch["input_ids"], original["input_ids"])  # (the rows come shuffled: compare sets)
    counted = torch.zeros_like(batch["labels"], dtype=torch.bool)
    counted[:, :-1] = batch["labels"][:, 1:] != -100
    before = (original["labels"][:, 1:] != -100).sum()
    assert counted.sum() == before - len(data)  # one token fewer per row counts
    with torch.no_grad():
        z_s = initial(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[counted]
        z_t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[counted]
    targets = batch["labels"][:, 1:][counted[:, :-1]]
    task = F.cross_entropy(z_s, targets).item()
    log_t, log_s = F.log_softmax(z_t / 2.0, -1), F.log_softmax(z_s / 2.0, -1)
    kl = (4.0 * (log_t.exp() * (log_t - log_s)).sum(-1).mean()).item()
    assert logged["task_loss"] == pytest.approx(task, rel=1e-4)
    assert logged["logits_loss"] == pytest.approx(kl, rel=1e-4)


# ---- the shape of the package ------------------------------------------------------------------------------------


def _module_imports(path: Path) -> set[str]:
    """The package modules `path` imports (relative imports resolved), as dotted names under hf_distill."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    package = package.removesuffix(".__init__")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{node.module}" if node.module else base
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hf_distill"):
            found.add(node.module)
    return found


def test_no_import_cycle_and_small_files():
    files = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in PACKAGE.rglob("*.py")}
    graph = {name: {m for m in _module_imports(path) if m in files and m != name} for name, path in files.items()}
    # a package's __init__ re-exports its own modules: only arrows between different modules and packages count
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(trail[trail.index(nxt):] + [nxt])}")
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])
    sizes = {name: len(path.read_text().splitlines()) for name, path in files.items()}
    assert sizes["hf_distill.trainer"] <= 400
    assert max(sizes.values()) <= 450, max(sizes, key=sizes.get)


def test_no_function_over_sixty_lines():
    """Long orchestration is split by what it does: no function of the package is over 60 lines, its docstring
    excluded (counted from the source's own syntax tree)."""
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = node.body[0]
                docstring = (first.end_lineno - first.lineno + 1 if isinstance(first, ast.Expr)
                             and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str) else 0)
                lines = node.end_lineno - node.lineno + 1 - docstring
                if lines > 60:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.name} ({lines} lines)")
    assert not long, long


def test_the_folders_import_one_way():
    """The folders (and root modules) follow the flow: no two of them import each other, directly or around a circle
    (a stricter check than the modules' own: a folder is one room of the picture in docs/architecture.md)."""
    files = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in PACKAGE.rglob("*.py")}

    def room(module: str) -> str:
        return module.split(".")[1] if module.count(".") else module

    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        for target in _module_imports(path):
            if target in files and room(target) != room(name):
                graph.setdefault(room(name), set()).add(room(target))
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != 1, f"folders import each other: {' -> '.join(trail[trail.index(nxt):] + [nxt])}"
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2
        order.append(node)

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert {"data", "loss", "kernels", "signals", "teachers", "checks", "speed", "storage", "evaluation"} <= set(order)
