"""Shared fixtures: a tiny real model, settings on temporary folders, SQLite and PostgreSQL."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

from bot.settings import Settings
from tests.support.tiny_model import build_tiny_model

PG_ADMIN_URL = os.environ.get("APPRENTICE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def _postgres_database():
    """Create a fresh, empty PostgreSQL database; yield its URL; drop it afterwards."""
    import psycopg

    name = f"apprentice_test_{uuid.uuid4().hex[:12]}"
    admin = PG_ADMIN_URL.replace("postgresql://", "postgresql://", 1)
    try:
        conn = psycopg.connect(admin, autocommit=True)
    except psycopg.OperationalError as exc:  # pragma: no cover - CI always has it
        pytest.skip(f"PostgreSQL not reachable at {admin}: {exc}")
    conn.execute(f'CREATE DATABASE "{name}"')
    base = admin.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request, tmp_path):
    """Each test using this runs twice: on a SQLite file and on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'apprentice.db'}"
    else:
        yield from _postgres_database()


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'apprentice.db'}"


@pytest.fixture
def make_settings(tmp_path, tiny_model_dir, sqlite_url):
    """Settings on temporary folders and the tiny model; keyword overrides win."""

    def make(**overrides) -> Settings:
        values = dict(
            database_url=sqlite_url,
            adapters_dir=tmp_path / "adapters",
            model_cache_dir=tmp_path / "model-cache",
            base_model=str(tiny_model_dir),
            device="cpu",
            max_new_tokens=8,
            batch_size=4,
            slack_bot_token="xoxb-test-token",
            slack_signing_secret="test-signing-secret",
            slack_app_token="",
            admins=["UADMIN"],
            experts=["UEXPERT"],
        )
        values.update(overrides)
        return Settings(_env_file=None, **values)

    return make


def kernel_buildable() -> bool:
    """Whether the skinny kernel can be built here: g++ and a CPU with AVX2 and FMA."""
    try:
        cpu = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return shutil.which("g++") is not None and " avx2 " in cpu and " fma " in cpu


@pytest.fixture
def library(kernel_dir):
    """The skinny kernel, built in this session's folder; where it cannot be, the test skips
    (and where it can, it must build)."""
    from bot.engine import skinny

    if not kernel_buildable():
        pytest.skip("the skinny kernel needs g++ and a CPU with AVX2 and FMA")
    built = skinny.load(folder=kernel_dir)
    assert built is not None, "g++ and AVX2 with FMA are here: the kernel must build"
    return built


@pytest.fixture
def shape_table(library):
    """The kernel's shape table (process-wide: skinny.set_shape) put back after the test."""
    from bot.engine import skinny

    rows = range(1, skinny.SHAPE_ROWS + 1)
    saved = [skinny.shape_for(library, count) for count in rows]
    yield library
    for count, index in zip(rows, saved, strict=True):
        skinny.set_shape(library, count, index)


@pytest.fixture(params=[0, 1, 2], ids=lambda index: f"shape{index}")
def kernel_shape(request, shape_table):
    """Every product of the kernel in shape `request.param` (skinny.shapes) during the test,
    where this build has it (skipped where not: AVX2 builds have one)."""
    from bot.engine import skinny

    if request.param >= len(skinny.shapes(shape_table)):
        pytest.skip(f"this build of the kernel has no shape {request.param}")
    for count in range(1, skinny.SHAPE_ROWS + 1):
        skinny.set_shape(shape_table, count, request.param)
    return request.param


@pytest.fixture(scope="session")
def kernel_dir(tmp_path_factory):
    """Where the skinny kernel is built: once a test session, never in the user's cache."""
    return tmp_path_factory.mktemp("kernels")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path, kernel_dir):
    """No test reads the developer's .env or real Slack variables, or writes outside tmp."""
    for key in list(os.environ):
        if key.startswith(("APPRENTICE_", "SLACK_")):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("APPRENTICE_KERNEL_DIR", str(kernel_dir))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
