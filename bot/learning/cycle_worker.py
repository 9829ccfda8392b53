"""The training process of a learning cycle: `python -m bot.learning.cycle_worker`.

Started by `bot.learning.cycle` with one JSON object on stdin (settings, training
configuration, the run id, the data snapshot's time and hash). It rebuilds the training set as
of that snapshot, so it trains on exactly the examples the parent recorded, then runs
`train_new_version` on the existing run row. Exit status 0 = the row says how it ended
(promoted or refused); 1 = it failed and the row says why.

It must not outlive its parent: the parent holds the training lease, and an orphan that
published after the lease lapsed could race a newer cycle. So it asks Linux to SIGKILL it when
the parent thread goes (`PR_SET_PDEATHSIG`) and, wherever that is missing, a thread watches
the parent pid.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
import threading
import time
from datetime import datetime

PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the watcher below does it
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(3)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main() -> int:
    payload = json.loads(sys.stdin.read())
    _die_with_parent(int(payload["parent_pid"]))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s training[%(process)d] %(levelname)s %(message)s"
    )
    log = logging.getLogger("bot.learning.cycle_worker")

    from bot.learning.config import TrainingConfig
    from bot.learning.dataset import build_training_set
    from bot.learning.pipeline import train_new_version
    from bot.settings import Settings
    from bot.store.db import make_engine, session_scope

    settings = Settings.model_validate(payload["settings"])
    if settings.train_nice:
        try:  # the bot's answers first: training gets the CPU time they leave
            os.nice(settings.train_nice)
        except OSError as exc:
            log.warning("could not lower the training priority: %s", exc)
    run_id = int(payload["run_id"])
    db = make_engine(settings.database_url)  # the parent migrated it
    snapshot = datetime.fromisoformat(payload["snapshot"])
    with session_scope(db) as session:
        training_set = build_training_set(session=session, now=snapshot)
    if training_set.dataset_hash != payload["dataset_hash"]:
        log.warning("run #%d: the data snapshot differs from the parent's", run_id)

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        report = train_new_version(
            settings=settings,
            examples=training_set.examples,
            trigger=payload["trigger"],
            progress=False,
            actor=payload["actor"],
            config=TrainingConfig.from_dict(payload["config"]),
            db=db,
            run_id=run_id,
        )
    except Exception:
        log.exception("run #%d failed", run_id)  # the pipeline recorded it on the run row
        return 1
    finally:
        db.dispose()
    log.info("run #%d: %s %s", run_id, report.version, "promoted" if report.promoted else "refused")
    return 0


if __name__ == "__main__":
    sys.exit(main())
