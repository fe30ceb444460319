"""Output folders: a new run never deletes or mixes with an earlier one.

A run writes into a folder that is empty, new, or that it resumes from. A folder holding an earlier run is refused
(the Trainer's `save_total_limit` rotation would delete its checkpoints, and its stale files, e.g. an
`adapter_config.json`, would sit beside the new student) unless the user says to overwrite: then the earlier contents
are moved aside, whole, into ``<folder>.before-<date>-<time>`` beside it. Nothing is ever deleted.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from transformers.utils import logging

logger = logging.get_logger(__name__)


def earlier_run(folder: str | os.PathLike, checkpoints_only: bool = False) -> list[str]:
    """What of an earlier run `folder` holds (sorted names; `checkpoints_only`: its ``checkpoint-*`` folders only).
    A `ValueError` when `folder` is a file."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output_dir {str(path)!r} is a file, not a folder: choose a folder path for the run.")
    if not path.is_dir():
        return []
    names = sorted(p.name for p in path.iterdir())
    return [n for n in names if n.startswith("checkpoint-")] if checkpoints_only else names


#: How the command line and the Python API say "resume" and "overwrite".
CLI_WORDS = ("--resume_from_checkpoint true", "--overwrite_output_dir true")
API_WORDS = ("trainer.train(resume_from_checkpoint=True)", "DistillationConfig(overwrite_output_dir=True)")


def check_output_dir(folder: str, resuming: bool, overwrite: bool, checkpoints_only: bool = False,
                     words: tuple[str, str] = CLI_WORDS) -> bool:
    """Whether `folder` must be moved aside before the run (True only with `overwrite` and an earlier run there).
    Refuses, with the ways out, a folder holding an earlier run that is neither resumed nor to be overwritten."""
    found = earlier_run(folder, checkpoints_only)
    if not found or resuming:
        return False
    if overwrite:
        return True
    shown = ", ".join(found[:6]) + (f", ... ({len(found)} entries)" if len(found) > 6 else "")
    raise ValueError(
        f"output_dir {folder!r} already holds an earlier run ({shown}): a new run there would delete its checkpoints "
        f"and leave its files beside the new student. Resume it ({words[0]}), choose another output_dir, or pass "
        f"{words[1]} to move its contents aside into a dated folder beside it."
    )


def move_aside(folder: str) -> str:
    """Rename `folder` to ``<folder>.before-YYYYmmdd-HHMMSS`` (a number appended if that exists too) and create it
    again, empty; returns the new name of the earlier contents."""
    path = Path(folder)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.before-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.before-{stamp}-{n}")
    os.replace(path, target)
    path.mkdir()
    logger.warning("output_dir %s held an earlier run: moved it aside to %s.", folder, target)
    return str(target)


def move_aside_on_main(args) -> str | None:
    """`move_aside(args.output_dir)` on the main process while the others wait for it (`args`: `TrainingArguments`);
    returns the earlier run's new name on the main process, None on the others."""
    moved = None
    with args.main_process_first(local=False, desc="moving the earlier run aside"):
        if args.process_index == 0:
            moved = move_aside(args.output_dir)
    return moved


def prepare_output_dir(args, resuming: bool, checkpoints_only: bool = False,
                       words: tuple[str, str] = CLI_WORDS) -> str | None:
    """`check_output_dir` on every process, then `move_aside_on_main` where it says so. `args`: `TrainingArguments`
    with `overwrite_output_dir`. Returns where the earlier run went, or None."""
    if not check_output_dir(args.output_dir, resuming, getattr(args, "overwrite_output_dir", False),
                            checkpoints_only, words):
        return None
    return move_aside_on_main(args)
