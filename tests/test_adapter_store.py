"""The adapter store: validation, atomic publishing, promote/rollback/list, the follower.

Real adapters (trained for two steps on the tiny model), real databases (SQLite and
PostgreSQL), a real `AnswerEngine` for the follower.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from sqlmodel import select

from bot.adapter_store import (
    AdapterInvalid,
    AdapterRegistry,
    RollbackImpossible,
    UnknownVersion,
    publish_adapter,
    validate_adapter_folder,
)
from bot.adapter_store.files import next_version_name
from bot.store.db import open_database, session_scope
from bot.store.models import AdapterActivation, AdapterVersion


@pytest.fixture(scope="module")
def tiny_loaded_module(tiny_model_dir, tmp_path_factory):
    from bot.engine.loading import load_base_model

    return load_base_model(
        str(tiny_model_dir), device="cpu", cache_dir=tmp_path_factory.mktemp("cache")
    )


@pytest.fixture(scope="module")
def trained_adapter(tiny_loaded_module, tmp_path_factory) -> Path:
    from bot.learning.config import TrainingConfig
    from bot.learning.examples import Example
    from bot.learning.trainer import train_lora

    out = train_lora(
        loaded=tiny_loaded_module,
        train=[Example("Which port?", "Port 8471."), Example("Who owns billing?", "Priya.")],
        held_out=[],
        config=TrainingConfig(max_steps=2),
        out_dir=tmp_path_factory.mktemp("trained") / "adapter",
        progress=False,
    )
    return out.adapter_dir


@pytest.fixture
def adapter_copy(trained_adapter, tmp_path):
    def make(name: str = "copy") -> Path:
        return Path(shutil.copytree(trained_adapter, tmp_path / name))

    return make


METADATA = {
    "base_model": "tiny",
    "training_config": {"r": 8},
    "dataset_hash": "abc",
    "example_count": 2,
    "example_ids": ["a", "b"],
    "metrics": {"recall": 1.0, "regression": 0.9},
}


# validation


def test_a_trained_adapter_validates(trained_adapter):
    config = validate_adapter_folder(trained_adapter)
    assert config["r"] == 8 and config["lora_alpha"] == 16


def corrupt_config_json(folder: Path) -> None:
    (folder / "adapter_config.json").write_text("{ not json")


def wrong_rank(folder: Path) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config["r"] = 16
    path.write_text(json.dumps(config))


def truncated_weights(folder: Path) -> None:
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])


def no_lora_tensors(folder: Path) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    save_file(
        {"something.weight": np.zeros((2, 2), dtype=np.float32)},
        folder / "adapter_model.safetensors",
    )


def missing_weights(folder: Path) -> None:
    (folder / "adapter_model.safetensors").unlink()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (corrupt_config_json, "does not parse"),
        (wrong_rank, "r=16"),
        (truncated_weights, "does not open"),
        (no_lora_tensors, "no lora_A/lora_B"),
        (missing_weights, "is missing"),
    ],
)
def test_damaged_folders_are_refused_with_a_reason(adapter_copy, damage, message):
    folder = adapter_copy()
    damage(folder)
    with pytest.raises(AdapterInvalid, match=message):
        validate_adapter_folder(folder)


def test_a_missing_folder_is_refused(tmp_path):
    with pytest.raises(AdapterInvalid, match="not a folder"):
        validate_adapter_folder(tmp_path / "v0009")


# publishing


def test_publish_is_atomic_and_names_are_never_reused(database_url, tmp_path, adapter_copy):
    db = open_database(database_url)
    root = tmp_path / "adapters"
    first = publish_adapter(root=root, source_dir=adapter_copy("a"), metadata=METADATA, db=db)
    second = publish_adapter(root=root, source_dir=adapter_copy("b"), metadata=METADATA, db=db)
    assert (first, second) == ("v0001", "v0002")
    assert sorted(p.name for p in root.iterdir()) == ["v0001", "v0002"]  # no .tmp-* left
    metadata = json.loads((root / "v0002" / "metadata.json").read_text())
    assert metadata["name"] == "v0002" and metadata["created_at"]
    assert metadata["example_ids"] == ["a", "b"] and metadata["metrics"]["recall"] == 1.0
    validate_adapter_folder(root / "v0002")
    # deleting the newest folder does not free its name: the DB row remembers it
    shutil.rmtree(root / "v0002")
    assert (
        publish_adapter(root=root, source_dir=adapter_copy("c"), metadata=METADATA, db=db)
        == "v0003"
    )
    with session_scope(db) as session:
        rows = {row.name: row for row in session.exec(select(AdapterVersion)).all()}
    assert sorted(rows) == ["v0001", "v0002", "v0003"]
    assert rows["v0003"].example_count == 2 and rows["v0003"].dataset_hash == "abc"


def test_next_name_also_counts_folders_the_database_does_not_know(sqlite_url, tmp_path):
    db = open_database(sqlite_url)
    root = tmp_path / "adapters"
    (root / "v0007").mkdir(parents=True)
    (root / "notes").mkdir()
    assert next_version_name(root=root, db=db) == "v0008"


def test_publishing_an_invalid_folder_leaves_nothing_behind(sqlite_url, tmp_path, adapter_copy):
    db = open_database(sqlite_url)
    root = tmp_path / "adapters"
    source = adapter_copy()
    wrong_rank(source)
    with pytest.raises(AdapterInvalid):
        publish_adapter(root=root, source_dir=source, metadata=METADATA, db=db)
    assert list(root.iterdir()) == []
    with session_scope(db) as session:
        assert session.exec(select(AdapterVersion)).all() == []


# registry


@pytest.fixture
def store(database_url, tmp_path, adapter_copy):
    """A registry with three published versions, none active."""
    db = open_database(database_url)
    root = tmp_path / "adapters"
    for name in ("a", "b", "c"):
        publish_adapter(root=root, source_dir=adapter_copy(name), metadata=METADATA, db=db)
    return AdapterRegistry(db=db, root=root)


def test_promote_rollback_and_list(store):
    assert store.active_version() is None
    assert [v.name for v in store.list_versions()] == ["v0001", "v0002", "v0003"]
    store.promote("v0001", actor="UADMIN")
    store.promote("v0002", actor="UADMIN", reason="better recall")
    assert store.active_version() == "v0002"
    assert [v.name for v in store.list_versions() if v.active] == ["v0002"]

    assert store.rollback(actor="UADMIN") == "v0001"
    assert store.active_version() == "v0001"
    info = {v.name: v for v in store.list_versions()}
    assert info["v0002"].rolled_back_at is not None and info["v0001"].rolled_back_at is None

    store.promote("v0003", actor="UADMIN")
    # v0002 was rolled back: rolling back from v0003 skips it
    assert store.rollback(actor="UADMIN") == "v0001"
    assert store.rollback(actor="UADMIN") is None  # the base model served before v0001
    with pytest.raises(RollbackImpossible, match="already active"):
        store.rollback(actor="UADMIN")
    with session_scope(store.db) as session:
        actions = [(r.action, r.version) for r in session.exec(select(AdapterActivation)).all()]
    assert actions == [
        ("promote", "v0001"),
        ("promote", "v0002"),
        ("rollback", "v0001"),
        ("promote", "v0003"),
        ("rollback", "v0001"),
        ("rollback", None),
    ]


def test_rollback_with_no_history_is_a_clear_error(store):
    with pytest.raises(RollbackImpossible, match="no adapter was ever promoted"):
        store.rollback(actor="UADMIN")


def test_promote_refuses_unknown_and_corrupt_versions_and_keeps_the_active_one(store):
    store.promote("v0001", actor="UADMIN")
    with pytest.raises(UnknownVersion, match="no adapter version 'v0042'"):
        store.promote("v0042", actor="UADMIN")
    with pytest.raises(UnknownVersion, match="no adapter version 'latest'"):
        store.promote("latest", actor="UADMIN")
    corrupt_config_json(store.path("v0002"))
    with pytest.raises(AdapterInvalid, match="refusing to promote v0002"):
        store.promote("v0002", actor="UADMIN")
    shutil.rmtree(store.path("v0003"))
    with pytest.raises(AdapterInvalid, match="not a folder"):
        store.promote("v0003", actor="UADMIN")
    assert store.active_version() == "v0001"
    assert not next(v for v in store.list_versions() if v.name == "v0003").on_disk


def test_rollback_to_a_corrupt_version_changes_nothing(store):
    store.promote("v0001", actor="UADMIN")
    store.promote("v0002", actor="UADMIN")
    truncated_weights(store.path("v0001"))
    with pytest.raises(AdapterInvalid, match="cannot roll back to v0001"):
        store.rollback(actor="UADMIN")
    assert store.active_version() == "v0002"


# the follower


def test_follower_swaps_a_running_engine_and_survives_a_broken_version(
    sqlite_url, tmp_path, adapter_copy, tiny_loaded_module
):
    from bot.adapter_store.follower import AdapterFollower
    from bot.engine.worker import AnswerEngine

    db = open_database(sqlite_url)
    root = tmp_path / "adapters"
    for name in ("a", "b"):
        publish_adapter(root=root, source_dir=adapter_copy(name), metadata=METADATA, db=db)
    registry = AdapterRegistry(db=db, root=root)
    engine = AnswerEngine(
        tiny_loaded_module,
        system_prompt="Be brief.",
        max_input_tokens=256,
        max_new_tokens=4,
        batch_size=4,
    )
    with engine:
        follower = AdapterFollower(registry=registry, engine=engine, poll_s=0.05)
        assert follower.sync_now() is None
        assert engine.answer("Which port?", timeout=60).adapter_version is None

        registry.promote("v0001", actor="UADMIN")
        assert follower.sync_now() == "v0001"
        assert engine.answer("Which port?", timeout=60).adapter_version == "v0001"

        # v0002 breaks on disk after a valid promotion: the engine keeps serving v0001
        registry.promote("v0002", actor="UADMIN")
        truncated_weights(root / "v0002")
        assert follower.sync_now() == "v0001"
        assert "v0002" in follower.failed and "v0002" in follower.last_error
        assert engine.answer("Which port?", timeout=60).adapter_version == "v0001"

        # the thread follows a rollback on its own
        registry.rollback(actor="UADMIN")
        with follower:
            registry.promote("v0001", actor="UADMIN")  # pointer moves back and forth
            registry.rollback(actor="UADMIN")
            deadline = time.monotonic() + 30
            while engine.active_version is not None and time.monotonic() < deadline:
                time.sleep(0.05)
        assert registry.active_version() is None
        assert engine.active_version is None
        assert engine.answer("Which port?", timeout=60).adapter_version is None
