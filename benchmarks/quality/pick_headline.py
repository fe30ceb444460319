"""Which run of the classification benchmark is the headline: per dataset, the run (JSON from
bench_classification.py --output) whose best distilled configuration has the higher dev mean; its test numbers go into
docs/results/quality.json. Never looks at a test split to choose.

    python benchmarks/quality/pick_headline.py docs/results/quality_classification.json \
        docs/results/quality_classification_attempt2_rotten_tomatoes.json \
        docs/results/quality_classification_attempt2_trec.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import QUALITY_JSON, mean_std, merge_quality


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="JSON records of bench_classification.py runs")
    parser.add_argument("--quality_json", default=QUALITY_JSON)
    options = parser.parse_args()
    best: dict[str, tuple[float, str, dict]] = {}
    for path in options.runs:
        with open(path) as f:
            record = json.load(f)
        for name, result in record["results"].items():
            dev = mean_std([r["dev_accuracy"] for r in result["runs"][result["best_on_dev"]]])[0]
            print(f"{name}: {path}: best on dev {result['best_on_dev']}, dev {dev:.4f}")
            if name not in best or dev > best[name][0]:
                best[name] = (dev, path, result)
    for name, (_, path, result) in best.items():
        def test(config: str, result: dict = result) -> float:
            return mean_std([r["test_accuracy"] for r in result["runs"][config]])[0]

        entry = {"teacher_accuracy": result["teacher"]["test_accuracy"],
                 "student_hard_label_accuracy": test("a_hard_labels"),
                 "student_distilled_accuracy": test(result["best_on_dev"]), "best_distilled": result["best_on_dev"],
                 "seeds": len(result["runs"]["a_hard_labels"]), "student_epochs": result["sizes"]["student_epochs"],
                 "student_layers": 3, "source": os.path.relpath(path)}
        merge_quality("classification", f"minilm-l6_{name}", entry, options.quality_json)
        print(f"{name} -> {path}: {entry}")


if __name__ == "__main__":
    main()
