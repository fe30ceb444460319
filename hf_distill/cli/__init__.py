"""The command line, ``hf-distill COMMAND``: its arguments (`arguments`), its jobs (`jobs`, with `models` for what
they load and `report` for what they print), and one-line errors for bad input (`clear_errors`)."""

from __future__ import annotations

import os
import sys
from typing import Sequence

from .arguments import (
    CacheArguments,
    ModelArguments,
    config_file_arguments,
    parse_distill_args,
)

__all__ = ["CacheArguments", "ModelArguments", "clear_errors", "config_file_arguments", "main", "parse_distill_args"]


COMMANDS = {
    "distill": "distill a teacher into a student (scripts/distill.py)",
    "train-teacher": "fine-tune a teacher on the task first (scripts/train_teacher.py)",
    "cache-teacher": "store the teacher's top-k outputs on the training set (scripts/cache_teacher.py)",
    "generate": "the teacher answers a prompt-only dataset: prompt-completion data to distil on",
    "evaluate": "a student beside its teacher (and its start): held-out scores, answers, draft acceptance, HumanEval",
    "assets": "fetch the offline real models and datasets: hf-distill assets fetch NAME [NAME ...] | list",
}


def main(argv: Sequence[str] | None = None) -> None:
    """``hf-distill COMMAND ...``: distill, train-teacher, cache-teacher, assets."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<14} {text}" for name, text in COMMANDS.items()]
        print("usage: hf-distill COMMAND [options]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            raise SystemExit(f"hf-distill: unknown command {argv[0]!r}")
        return
    command, rest = argv[0], argv[1:]
    with clear_errors(f"hf-distill {command}"):
        _run_command(command, rest)


#: Errors that mean the input is wrong (not the code): shown as one line, without a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)


class clear_errors:
    """Context manager for the command line: a bad input (`USER_ERRORS`) ends the program with exit code 2 and one
    line ``<command>: error: <message>`` on stderr instead of a traceback (``HF_DISTILL_TRACEBACK=1`` shows it)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __enter__(self) -> "clear_errors":
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if error is None or not isinstance(error, USER_ERRORS) or os.environ.get("HF_DISTILL_TRACEBACK") == "1":
            return False
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{self.command}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


def _run_command(command: str, rest: list[str]) -> None:
    if command == "distill":
        from .jobs import distill_main

        distill_main(rest)
    elif command == "train-teacher":
        from .jobs import train_teacher_main

        train_teacher_main(rest)
    elif command == "generate":
        from .jobs import generate_main

        generate_main(rest)
    elif command == "cache-teacher":
        from .jobs import cache_teacher_main

        cache_teacher_main(rest)
    elif command == "evaluate":
        from .evaluate import evaluate_main

        evaluate_main(rest)
    else:
        from ..data.assets import assets_main

        assets_main(rest)
