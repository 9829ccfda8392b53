"""Acknowledgement latency under a burst: 20 questions arrive at once; how fast does the bot ack?

Slack waits 3 s for the HTTP response to an event before it counts a failure and retries. The
bot's listeners only parse, store and hand off (generation runs on the engine's worker), so the
ack should stay far below that even while the engine is busy with the whole burst. This runs
the real app over signed HTTP against the local emulator, times every event request as Slack
would see it (sign, send, response), and prints the worst one as a ratio of Slack's 3 s.

    python bench/ack_bench.py                 # tiny model, SQLite
    python bench/ack_bench.py --real          # the packaged SmolLM2-135M (slower answers)
    python bench/ack_bench.py --database-url postgresql://postgres@127.0.0.1:5432/bench
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SLACK_ACK_LIMIT_S = 3.0


def build_settings(args, tmp: Path):
    from bot.settings import Settings

    values = dict(
        database_url=args.database_url or f"sqlite:///{tmp / 'bench.db'}",
        adapters_dir=tmp / "adapters",
        device="cpu",
        max_new_tokens=args.max_new_tokens,
        batch_size=8,
        slack_bot_token="xoxb-bench",
        slack_signing_secret="bench-signing-secret",
        admins=["UADMIN"],
        experts=["UEXPERT"],
    )
    if not args.real:
        from tests.support.tiny_model import build_tiny_model

        values.update(base_model=str(build_tiny_model(tmp / "tiny")), model_cache_dir=tmp / "mc")
    return Settings(_env_file=None, **values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--real", action="store_true", help="use the packaged SmolLM2-135M")
    parser.add_argument("--database-url", default="")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()

    from bot.slack.local import LocalSlack

    with tempfile.TemporaryDirectory() as folder:
        settings = build_settings(args, Path(folder))
        started = time.perf_counter()
        bot = LocalSlack.start(settings)
        print(f"bot ready in {time.perf_counter() - started:.1f} s ({settings.base_model})")
        emulator = bot.emulator
        users = [f"UBENCH{i:02d}" for i in range(args.questions)]
        for user in users:
            emulator.add_user(user, name=user.lower())
        emulator.add_channel("CBENCH", name="bench", members=[*users, "UBOT"])

        acks: list[float] = []
        lock = threading.Lock()
        send = emulator.deliverer.send

        def timed_send(**kwargs):  # every HTTP request to /slack/events, as Slack sees it
            t0 = time.perf_counter()
            result = send(**kwargs)
            with lock:
                acks.append(time.perf_counter() - t0)
            return result

        emulator.deliverer.send = timed_send
        gate = threading.Barrier(args.questions)

        def ask(user: str) -> tuple[str, float]:
            gate.wait()  # all at once
            t0 = time.perf_counter()
            ts = emulator.post_message(
                user=user, channel="CBENCH", text=f"<@UBOT> question from {user}: how do we deploy?"
            )
            return ts, t0

        burst = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.questions) as pool:
            asked = list(pool.map(ask, users))
        answered = []
        for ts, t0 in asked:
            emulator.wait_for_message(
                channel="CBENCH",
                thread_ts=ts,
                user="UBOT",
                predicate=lambda m: (
                    any(b.get("type") == "actions" for b in m.get("blocks") or [])
                    or "could not" in m.get("text", "")
                ),
                timeout=600,
            )
            answered.append(time.perf_counter() - t0)
        total = time.perf_counter() - burst
        retries = sum(1 for d in emulator.deliveries if d.result.attempts > 1)
        bot.close()

    worst = max(acks)
    print(f"{args.questions} questions at once -> {len(acks)} event requests, {retries} retried")
    print(
        f"ack latency: median {statistics.median(acks) * 1000:.1f} ms, "
        f"p95 {sorted(acks)[int(0.95 * (len(acks) - 1))] * 1000:.1f} ms, "
        f"max {worst * 1000:.1f} ms"
    )
    print(f"max ack / Slack's {SLACK_ACK_LIMIT_S:.0f} s limit = {worst / SLACK_ACK_LIMIT_S:.4f}")
    print(
        f"answers: all {len(answered)} done in {total:.1f} s "
        f"(median {statistics.median(answered):.1f} s after their question)"
    )


if __name__ == "__main__":
    main()
