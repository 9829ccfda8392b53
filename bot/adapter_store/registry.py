"""The versions and the active-version pointer, kept in the database.

The pointer is the newest `AdapterActivation` row (its `version` None = the base model alone);
promote and rollback append rows, so the history of what served when is never lost, and every
replica that shares the database follows the same pointer (`bot.adapter_store.follower`).

Rollback restores the version that was active before the current one, skipping versions that
were themselves rolled back (a rolled-back version is presumed bad until someone promotes it
again by name), and falls back to the base model when nothing older is left.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import Engine
from sqlmodel import col, select

from bot.adapter_store.files import AdapterInvalid, validate_adapter_folder, version_number
from bot.store.db import session_scope
from bot.store.models import AdapterActivation, AdapterVersion, utcnow

BASE = "the base model (no adapter)"


class UnknownVersion(LookupError):
    """No published version has this name."""

    def __str__(self) -> str:  # LookupError would quote the message like a key
        return str(self.args[0]) if self.args else "unknown version"


class RollbackImpossible(RuntimeError):
    """There is nothing to roll back to; the message says what is active."""


@dataclass(frozen=True)
class VersionInfo:
    name: str
    base_model: str
    created_at: datetime
    example_count: int
    dataset_hash: str | None
    metrics: dict
    rolled_back_at: datetime | None
    active: bool
    path: Path
    on_disk: bool  # the folder is present here (it may have been deleted by hand)


class AdapterRegistry:
    def __init__(self, *, db: Engine, root: Path):
        self.db = db
        self.root = Path(root)

    def path(self, name: str) -> Path:
        if version_number(name) is None:
            raise UnknownVersion(f"{name!r} is not a version name; names look like v0001")
        return self.root / name

    def list_versions(self) -> list[VersionInfo]:
        """Every published version, oldest first."""
        active = self.active_version()
        with session_scope(self.db) as session:
            rows = session.exec(select(AdapterVersion)).all()
        rows = sorted(rows, key=lambda row: (version_number(row.name) or 0, row.name))
        return [
            VersionInfo(
                name=row.name,
                base_model=row.base_model,
                created_at=row.created_at,
                example_count=row.example_count,
                dataset_hash=row.dataset_hash,
                metrics=dict(row.metrics or {}),
                rolled_back_at=row.rolled_back_at,
                active=row.name == active,
                path=self.root / row.name,
                on_disk=(self.root / row.name).is_dir(),
            )
            for row in rows
        ]

    def _history(self, session) -> list[AdapterActivation]:
        # Newest first by id: ids grow with inserts, clocks of replicas need not agree.
        statement = select(AdapterActivation).order_by(col(AdapterActivation.id).desc())
        return list(session.exec(statement).all())

    def active_version(self) -> str | None:
        """The active version's name; None when the base model serves alone."""
        with session_scope(self.db) as session:
            statement = (
                select(AdapterActivation).order_by(col(AdapterActivation.id).desc()).limit(1)
            )
            newest = session.exec(statement).first()
            return newest.version if newest else None

    def _known(self, session, name: str) -> AdapterVersion:
        row = session.get(AdapterVersion, name)
        if row is None:
            known = sorted(session.exec(select(AdapterVersion.name)).all())
            hint = f"known versions: {', '.join(known[-5:])}" if known else "none published yet"
            raise UnknownVersion(
                f"no adapter version {name!r} ({hint}); see `apprentice adapters list`"
            )
        return row

    def promote(self, name: str, *, actor: str | None, reason: str | None = None) -> str:
        """Make `name` the active version, after checking its folder; return the name.

        Raises `UnknownVersion` or `AdapterInvalid`; the active version is unchanged then.
        """
        with session_scope(self.db) as session:
            row = self._known(session, name)
            try:
                validate_adapter_folder(self.path(name))
            except AdapterInvalid as exc:
                raise AdapterInvalid(
                    f"refusing to promote {name}: {exc}; the active version is unchanged"
                ) from exc
            row.rolled_back_at = None  # promoting by name vouches for it again
            session.add(row)
            session.add(
                AdapterActivation(
                    version=name, action="promote", actor=actor, reason=reason, created_at=utcnow()
                )
            )
        return name

    def rollback(self, *, actor: str | None, reason: str | None = None) -> str | None:
        """Restore the version active before the current one; return it (None = base model).

        Raises `RollbackImpossible` when there is no earlier state, `AdapterInvalid` when the
        earlier version's folder no longer validates (nothing changes then).
        """
        with session_scope(self.db) as session:
            history = self._history(session)
            if not history:
                raise RollbackImpossible(
                    f"nothing to roll back: no adapter was ever promoted, {BASE} is serving"
                )
            current = history[0].version
            target: str | None = None
            for row in history[1:]:
                if row.version == current:
                    continue
                if row.version is None:
                    break  # the base model served before: go back to it
                earlier = session.get(AdapterVersion, row.version)
                if earlier is not None and earlier.rolled_back_at is None:
                    target = row.version
                    break
            if current is None and target is None:
                raise RollbackImpossible(
                    f"nothing to roll back: {BASE} is already active and no earlier version is "
                    "left that was not rolled back; promote one by name instead"
                )
            if target is not None:
                try:
                    validate_adapter_folder(self.path(target))
                except AdapterInvalid as exc:
                    raise AdapterInvalid(
                        f"cannot roll back to {target}: {exc}; promote another version by name"
                    ) from exc
            now = utcnow()
            if current is not None:
                rolled = session.get(AdapterVersion, current)
                if rolled is not None:
                    rolled.rolled_back_at = now
                    session.add(rolled)
            session.add(
                AdapterActivation(
                    version=target,
                    action="rollback",
                    actor=actor,
                    reason=reason or f"rollback from {current}",
                    created_at=now,
                )
            )
        return target
