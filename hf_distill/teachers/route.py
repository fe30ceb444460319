"""Checkpoint routes (route-constrained optimisation, Jin et al. 2019): the teacher changes along the run."""

from __future__ import annotations

import gc
import json
import os
from typing import Any, Callable, Sequence

import torch
from torch import nn
from transformers.utils import logging

from .live import LiveTeachers

logger = logging.get_logger(__name__)


def route_boundaries(num_anchors: int, total_steps: int, route_steps: Sequence[int] | None = None) -> list[int]:
    """The global step at which each anchor takes over: ``[0, s_1, ..., s_{K-1}]``; equal shares by default
    (anchor k from ``round(k * total_steps / K)``)."""
    if route_steps is not None:
        return [0, *[int(s) for s in route_steps]]
    return [round(k * total_steps / num_anchors) for k in range(num_anchors)]


def anchor_at(step: int, boundaries: Sequence[int]) -> int:
    """Index of the anchor teaching at global step `step` (0-based)."""
    return max(k for k, start in enumerate(boundaries) if step >= start)


def load_checkpoint_model(path: str, dtype: torch.dtype | None = None) -> nn.Module:
    """A transformers model from a checkpoint folder, with the class its config names (``architectures[0]``);
    no remote code."""
    import transformers

    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(
            f"Route anchor {path!r} has no config.json: teacher_route takes folders written by save_pretrained / "
            "Trainer checkpoints (or pass route_loader=... to DistillationTrainer)."
        )
    with open(config_file) as handle:
        architectures = json.load(handle).get("architectures") or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        raise ValueError(
            f"Cannot tell which class to load route anchor {path!r} with (config architectures={architectures}); "
            "pass route_loader=... to DistillationTrainer."
        )
    kwargs = {"dtype": dtype} if dtype is not None else {}
    return model_class.from_pretrained(path, **kwargs)


class TeacherRoute:
    """The anchors of a route and which one is loaded; only one teacher is in memory at a time."""

    def __init__(self, paths: Sequence[str], loader: Callable[[str], nn.Module], route_steps: Sequence[int] | None):
        if not paths:
            raise ValueError("teacher_route is empty: give at least one checkpoint folder.")
        self.paths = list(paths)
        self.loader = loader
        self.route_steps = route_steps
        self.boundaries: list[int] | None = None
        self.planned_for: int | None = None  # the run length the boundaries were computed for
        self.current: int | None = None

    def plan(self, total_steps: int) -> None:
        """Fix the switching steps for a run of `total_steps` optimizer steps (once per run length)."""
        if self.planned_for != total_steps:
            self.boundaries = route_boundaries(len(self.paths), total_steps, self.route_steps)
            self.planned_for = total_steps

    def anchor_for(self, step: int) -> int:
        return anchor_at(step, self.boundaries) if self.boundaries else 0

    def load(self, index: int) -> nn.Module:
        self.current = index
        return self.loader(self.paths[index])


class RouteTeachers(LiveTeachers):
    """The route's anchors as the teacher source: anchor k teaches from its boundary step on, one in memory."""

    def __init__(self, paths: Sequence[str], loader: Callable[[str], nn.Module] | None,
                 route_steps: Sequence[int] | None) -> None:
        self.route = TeacherRoute(paths, loader or load_checkpoint_model, route_steps)
        super().__init__([self.route.load(0)])

    def on_step(self, state: Any) -> None:
        """Load the anchor that teaches at this global step (the previous one is released first)."""
        route = self.route
        route.plan(state.max_steps)
        anchor = route.anchor_for(state.global_step)
        if anchor == route.current:
            return
        self._models = []
        gc.collect()
        logger.info("Route: anchor %d (%s) teaches from step %d.", anchor, route.paths[anchor], state.global_step)
        self._models = [self.prepare_model(route.load(anchor))]
        self.on_new_models()

    def log_values(self) -> dict[str, float]:
        return {"teacher_anchor": self.route.current} if self.route.current is not None else {}
