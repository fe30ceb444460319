"""Speed of this tree against another commit's, side by side in one run: `bench_vs_trl.py` (our trainer rows) and
`bench_logits_loss.py`, alternating trees round by round so that a noisy neighbour hits both alike.

    git worktree add /tmp/prev HEAD~1
    python benchmarks/against_commit.py --other /tmp/prev --rounds 3
    python benchmarks/against_commit.py --other /tmp/prev --rounds 5 --aa   # + the other commit against itself

With ``--aa`` each round also runs the other tree a second time ("other again"): its ratio to the first run is the
spread of an A/A comparison on this machine now, the yardstick for "no slowdown".
Each tree's benchmarks run with its own `hf_distill` (its folder first on the path, the editable install hidden). Prints per row the median over rounds for each tree and the ratio this / other (time: lower is
better; tokens/s: higher is better). An empty ``--trl_args ""`` or ``--loss_args ""`` skips that benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
HIDE_EDITABLE = ("import sys\nsys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f) and "
                 "'editable' not in (getattr(f, '__module__', '') or '')]\n")


def run(tree: Path, script: str, args: list[str], env_dir: Path, out: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(env_dir), str(tree)])  # (each tree its own hf_distill)
    command = [sys.executable, str(tree / "benchmarks" / script), *args, "--output", str(out)]
    subprocess.run(command, check=True, cwd=tempfile.gettempdir(), env=env, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", required=True, help="a worktree of the commit to compare against")
    parser.add_argument("--this", default=str(HERE), help="the tree measured as 'this' (default: this checkout; a "
                                                            "worktree of it keeps the run apart from edits made meanwhile)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trl_args", default="--trainers ours ours-plain --batch_size 2 --seq_len 128 --steps 6 "
                                              "--warmup 2")
    parser.add_argument("--loss_args", default="--vocab 49152 --tokens 512 1024 --repeats 3")
    parser.add_argument("--aa", action="store_true", help="also run the other tree twice a round (the A/A spread)")
    opts = parser.parse_args()
    other, this = Path(opts.other).resolve(), Path(opts.this).resolve()
    samples: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as work:
        env_dir = Path(work) / "hide"
        env_dir.mkdir()
        (env_dir / "sitecustomize.py").write_text(HIDE_EDITABLE)
        for round_ in range(opts.rounds):
            trees = [("other", other), ("this", this)] + ([("other again", other)] if opts.aa else [])
            for name, tree in trees if round_ % 2 == 0 else trees[::-1]:  # (alternating order)
                print(f"round {round_ + 1}/{opts.rounds}: {name} ({tree})", file=sys.stderr, flush=True)
                trl = run(tree, "bench_vs_trl.py", opts.trl_args.split(), env_dir, Path(work) / "trl.json") \
                    if opts.trl_args else {"rows": []}
                for row in trl["rows"]:
                    samples.setdefault((f"bench_vs_trl {row['trainer']} tokens/s", name), []).append(
                        row["tokens_per_s"])
                loss = run(tree, "bench_logits_loss.py", opts.loss_args.split(), env_dir, Path(work) / "loss.json") \
                    if opts.loss_args else {"rows": []}
                for pair in loss["rows"]:
                    for path, row in pair.items():
                        key = f"bench_logits_loss {path} {row['vocab']}x{row['tokens']} s"
                        samples.setdefault((key, name), []).append(row["seconds"])
    aa = " | other again | A/A: again / other" if opts.aa else ""
    print(f"\n| row | other (median of {opts.rounds}) | this | this / other{aa} |\n|---|---:|---:|---:|"
          + ("---:|---:|" if opts.aa else ""))
    for key in dict.fromkeys(k for k, _ in samples):
        a, b = statistics.median(samples[(key, "other")]), statistics.median(samples[(key, "this")])
        again = statistics.median(samples[(key, "other again")]) if opts.aa else None
        print(f"| {key} | {a:.4g} | {b:.4g} | {b / a:.3f}" + (f" | {again:.4g} | {again / a:.3f}" if opts.aa else "")
              + " |")
    print(f"\nsamples: {json.dumps({f'{k} [{n}]': v for (k, n), v in samples.items()})}")


if __name__ == "__main__":
    main()
