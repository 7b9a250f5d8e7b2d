"""The default model (worker/default_model.py): the bundled one, else a random one cached by content."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker import default_model as dm


@pytest.fixture
def no_bundled_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dm, "bundled_model_path", lambda: None)


def test_the_random_model_is_written_once_under_its_digest(tmp_path: Path, no_bundled_model: None) -> None:
    model = dm.default_model(tmp_path)
    assert model.untrained and model.path == tmp_path / dm.random_model_digest() / dm.RANDOM_MODEL_FILE
    assert model.path.is_file() and model.path.with_suffix(".yaml").is_file()
    assert (model.path.parent / "tokenizer" / "vocab.txt").is_file()
    written = {p: p.stat().st_mtime_ns for p in model.path.parent.rglob("*") if p.is_file()}
    again = dm.default_model(tmp_path)  # a second start (any process) reuses it, never rewrites it
    assert again == model
    assert {p: p.stat().st_mtime_ns for p in model.path.parent.rglob("*") if p.is_file()} == written
    assert [p.name for p in tmp_path.iterdir()] == [dm.random_model_digest()]  # no staging folder left behind


def test_the_digest_names_config_and_seed(tmp_path: Path) -> None:
    assert dm.random_model_digest() == dm.random_model_digest(dm.RANDOM_MODEL_SEED)
    assert dm.random_model_digest(1) != dm.random_model_digest(0)
    assert len(dm.random_model_digest()) == 16


def test_a_leftover_staging_folder_is_not_taken_for_the_model(tmp_path: Path, no_bundled_model: None) -> None:
    staging = tmp_path / f".{dm.random_model_digest()}-crashed"
    staging.mkdir()
    (staging / dm.RANDOM_MODEL_FILE).write_bytes(b"half")
    path = dm.random_model_path(tmp_path)
    assert path.parent.name == dm.random_model_digest() and path.stat().st_size > 1000


def test_the_bundled_model_wins_when_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundled = tmp_path / "bundled.safetensors"
    monkeypatch.setattr(dm, "bundled_model_path", lambda: bundled)
    assert dm.default_model(tmp_path / "cache") == dm.DefaultModel(bundled, False)
    assert not (tmp_path / "cache").exists()
