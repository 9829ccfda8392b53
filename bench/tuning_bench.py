"""Engine settings side by side in one run: thread tuning off (torch's thread count) and on.

    python bench/tuning_bench.py [--new-tokens 24] [--repeats 2]

For each engine: batch-1 decode tokens/s ÷ the bandwidth limit (as in serving_bench.py) and
wall time of 8 questions together ÷ one; `model.generate` on all threads and on one beside them.
Each figure is a median over interleaved repeats; the machine is shared, so read the columns of
one run against each other, never against another run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serving_bench import (  # noqa: E402
    QUESTIONS,
    concurrency,
    copy_bandwidth,
    decode_speed,
    generate_speed,
    make_engine,
    median,
    weight_bytes,
)
from bot.engine.loading import load_base_model  # noqa: E402
from bot.settings import DEFAULT_BASE_MODEL, Settings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch

    loaded = load_base_model(
        DEFAULT_BASE_MODEL, device="cpu", cache_dir=Settings(_env_file=None).model_cache_dir
    )
    most = torch.get_num_threads()
    weights = weight_bytes(loaded.model)
    n = args.new_tokens
    engines = {
        "off": make_engine(loaded, n, tune_threads=False).start(),
        "on": make_engine(loaded, n, tune_threads=True).start(),
    }
    for engine in engines.values():  # in this order: the untuned worker starts on all threads
        engine.answer("warm up", timeout=900)
    speeds = {name: [] for name in engines}
    bandwidths, plain = [], {most: [], 1: []}
    for _ in range(args.repeats):
        bandwidths.append(copy_bandwidth(loaded.device, threads=most))
        for name, engine in engines.items():
            speeds[name].append(decode_speed(engine, questions=QUESTIONS[:2], timeout=900))
        for threads in plain:
            torch.set_num_threads(threads)
            plain[threads].append(generate_speed(loaded, n=n, questions=QUESTIONS[:1]))
    limit = median(bandwidths) / weights
    out = {"threads": most, "new_tokens": n, "limit_tps": limit}
    for name, engine in engines.items():
        out[name] = {
            "decode_tps": median(speeds[name]),
            "decode_ratio": median(speeds[name]) / limit,
            "concurrency": concurrency(engine, repeats=args.repeats),
            "threads_chosen": engine.stats()["threads"],
        }
        print(name, out[name], flush=True)
    out["generate_ratio"] = {t: median(v) / limit for t, v in plain.items()}
    for engine in engines.values():
        engine.stop()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
