"""Adapter folders on disk: validating one, and publishing one as the next version, atomically.

A version is a folder `root/vNNNN/` in PEFT's own format (`adapter_config.json` +
`adapter_model.safetensors`) plus `metadata.json` (base model, training configuration, dataset
hash, example ids, metrics, created_at) and `loss.png`. Publishing copies into `root/.tmp-<uuid>`,
writes the metadata, validates the copy, and only then renames it into place: a reader never
sees a half-written version, and a crash leaves only a `.tmp-*` folder, which the next publish
sweeps away once it is an hour old. `os.rename` onto a non-empty folder fails, so two publishers
racing for one name cannot overwrite each other; the loser takes the next name.

Names are never reused: the next name is one past the highest seen in the folder AND in the
database, so deleting a folder (or losing a row) cannot bring an old name back.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from datetime import datetime
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from bot.learning.config import LORA_ALPHA, LORA_R, LORA_TARGET_MODULES
from bot.store.db import session_scope
from bot.store.models import AdapterVersion, utcnow

log = logging.getLogger(__name__)

VERSION_NAME = re.compile(r"^v(\d{4,})$")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
METADATA_FILE = "metadata.json"
STALE_TMP_S = 3600


class AdapterInvalid(ValueError):
    """A folder that is not a usable adapter of the fixed LoRA shape; says what is wrong."""


def validate_adapter_folder(path: Path | str) -> dict:
    """Check `path` holds a LoRA adapter of the fixed shape; return its parsed config.

    Checks: the folder exists; `adapter_config.json` parses and says LoRA with r and alpha equal
    to the fixed ones; `adapter_model.safetensors` opens and holds matching lora_A/lora_B pairs
    whose rank is r. Raises `AdapterInvalid` naming the problem.
    """
    path = Path(path)
    if not path.is_dir():
        raise AdapterInvalid(f"{path} is not a folder; is the version name right?")
    config_path = path / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterInvalid(f"{config_path} is missing: not a PEFT adapter folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterInvalid(
            f"{config_path} does not parse ({exc}); the version is corrupt"
        ) from exc
    if not isinstance(config, dict):
        raise AdapterInvalid(f"{config_path} is not a JSON object; the version is corrupt")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterInvalid(f"{config_path}: peft_type is {peft_type or 'missing'}, not LORA")
    shape = {"r": config.get("r"), "lora_alpha": config.get("lora_alpha")}
    if shape != {"r": LORA_R, "lora_alpha": LORA_ALPHA}:
        raise AdapterInvalid(
            f"{config_path}: LoRA r={shape['r']}, alpha={shape['lora_alpha']}, but every version "
            f"must use r={LORA_R}, alpha={LORA_ALPHA} (so a swap is a weight load); retrain it"
        )
    if not config.get("target_modules"):
        raise AdapterInvalid(f"{config_path}: no target_modules (expected {LORA_TARGET_MODULES})")

    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise AdapterInvalid(f"{weights_path} is missing; the version is corrupt")
    try:
        from safetensors import safe_open

        shapes = {}
        with safe_open(str(weights_path), framework="numpy") as weights:
            for key in weights.keys():
                shapes[key] = tuple(weights.get_slice(key).get_shape())
    except Exception as exc:  # safetensors raises several types for a damaged header
        raise AdapterInvalid(
            f"{weights_path} does not open ({exc}); the version is corrupt"
        ) from exc
    a_keys = {k.replace(".lora_A.", "."): v for k, v in shapes.items() if ".lora_A." in k}
    b_keys = {k.replace(".lora_B.", "."): v for k, v in shapes.items() if ".lora_B." in k}
    if not a_keys or not b_keys:
        raise AdapterInvalid(f"{weights_path} holds no lora_A/lora_B tensors; not a LoRA adapter")
    if a_keys.keys() != b_keys.keys():
        raise AdapterInvalid(f"{weights_path}: lora_A and lora_B tensors do not pair up; corrupt")
    for key, a_shape in a_keys.items():
        if len(a_shape) != 2 or a_shape[0] != LORA_R or b_keys[key][-1] != LORA_R:
            raise AdapterInvalid(
                f"{weights_path}: {key} has rank {a_shape[0] if a_shape else '?'}, not r={LORA_R}"
            )
    return config


def version_name(number: int) -> str:
    return f"v{number:04d}"


def version_number(name: str) -> int | None:
    match = VERSION_NAME.match(name)
    return int(match.group(1)) if match else None


def next_version_name(*, root: Path, db: Engine) -> str:
    """One past the highest version number among the folders under `root` and the DB rows."""
    numbers = [0]
    if root.is_dir():
        numbers += [n for n in (version_number(p.name) for p in root.iterdir()) if n is not None]
    with session_scope(db) as session:
        names = session.exec(select(AdapterVersion.name)).all()
    numbers += [n for n in (version_number(name) for name in names) if n is not None]
    return version_name(max(numbers) + 1)


def _sweep_stale_tmp(root: Path) -> None:
    cutoff = time.time() - STALE_TMP_S
    for tmp in root.glob(".tmp-*"):
        try:
            if tmp.stat().st_mtime < cutoff:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def _json_default(value):
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def publish_adapter(*, root: Path, source_dir: Path, metadata: dict, db: Engine) -> str:
    """Publish the adapter in `source_dir` as the next version under `root`; return its name.

    `metadata` should carry base_model, training_config, dataset_hash, example_count,
    example_ids and metrics; name and created_at are added. Raises `AdapterInvalid` (nothing is
    published) if the copy does not validate. Does not make the version active.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _sweep_stale_tmp(root)
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    shutil.copytree(source_dir, tmp)
    try:
        validate_adapter_folder(tmp)
        created_at = utcnow()
        for _attempt in range(20):
            name = next_version_name(root=root, db=db)
            record = {**metadata, "name": name, "created_at": created_at}
            (tmp / METADATA_FILE).write_text(
                json.dumps(record, indent=2, default=_json_default, sort_keys=True) + "\n",
                encoding="utf-8",
            )
            _fsync_tree(tmp)
            target = root / name
            try:
                os.rename(tmp, target)  # fails on a non-empty target: someone else took it
            except OSError:
                if not target.exists():
                    raise
                continue
            try:
                _insert_row(db, name=name, record=record, created_at=created_at)
            except IntegrityError:  # a row without a folder here (another host's store)
                os.rename(target, tmp)
                continue
            log.info("published adapter %s at %s", name, target)
            return name
        raise RuntimeError(f"could not find a free version name under {root} after 20 tries")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _insert_row(db: Engine, *, name: str, record: dict, created_at) -> None:
    with session_scope(db) as session:
        session.add(
            AdapterVersion(
                name=name,
                base_model=str(record.get("base_model", ""))[:256],
                dataset_hash=record.get("dataset_hash"),
                example_count=int(record.get("example_count") or 0),
                metrics=json.loads(json.dumps(record.get("metrics") or {}, default=_json_default)),
                created_at=created_at,
            )
        )


def _fsync_tree(folder: Path) -> None:
    """Flush the files to disk before the rename makes them visible (a crash then leaves
    either no version or a whole one)."""
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def read_metadata(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
