"""Serving ratios on the real default model: concurrency, adapter overhead, decode efficiency,
swaps under load and memory. Every figure is a ratio of two things measured side by side in this
run (the machines are shared and noisy); each is the median of `--repeats` tries.

    python bench/serving_bench.py [--new-tokens 48] [--repeats 3] [--json out.json]
                                  [--only decode concurrency adapter swaps memory]

1. concurrency: wall time of 8 questions submitted together ÷ one question (answers forced to
   the same length); plus a question arriving mid-answer: its latency ÷ its latency alone.
2. adapter overhead: per-token decode time with the active adapter (merged) ÷ the base model;
   the unmerged PEFT adapter is timed beside it for reference.
3. decode efficiency: batch-1 tokens/s ÷ the memory-bandwidth limit, where bandwidth comes from
   a large tensor copy in this run (bytes copied ÷ time: the convention under which plain
   `generate` read "about 53 %" when the goal was set) and the limit is bandwidth ÷ bytes of
   weights read per token; plain `model.generate` is measured beside it, and both ratios are
   also given counting the copy's reads and writes (STREAM's convention: half the ratios).
5. swaps under load: 50 questions with 10 adapter swaps among them: failed or duplicated answers,
   answers on the wrong version, and throughput ÷ the same run without swaps; the same swaps
   with the batch drained at each one (the engine's former way) beside it; `--swap-repeats`
   rounds, each ratio taken within a round, their median. Measured in a fresh
   process when this run also measures decode or adapter, as the bot starts. (Steps measured
   after a plain `generate` or PEFT in the same process were slower: OpenMP keeps a team of
   helper threads for each thread that ran a parallel op, and with more of them than cores
   every op waits for its helpers to wake; this script now runs such work in passing threads.)
7. memory: RSS of a fresh process serving as the bot does (cached model, engine, an adapter
   merged, 8 questions at once) ÷ the weights' bytes (this process has also run PEFT and
   `generate` for the other figures, so its own RSS would overstate the bot's).

The device is chosen as the bot chooses it (`auto`: CUDA in bf16 when present, else CPU float32).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import wait
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.engine_bench import make_random_adapter  # noqa: E402
from bot.engine.loading import load_base_model  # noqa: E402
from bot.engine.threads import in_passing_thread  # noqa: E402
from bot.engine.types import AnswerRequest  # noqa: E402
from bot.engine.worker import AnswerEngine  # noqa: E402
from bot.settings import DEFAULT_BASE_MODEL, DEFAULT_SYSTEM_PROMPT, Settings  # noqa: E402

TOPICS = ["deploys", "on-call", "releases", "backups", "billing", "alerts", "access", "laptops"]
QUESTIONS = [f"In two sentences, how does our team handle {topic}?" for topic in TOPICS]


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident memory now (VmRSS) or at its peak (VmHWM)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return 0


def weight_bytes(model) -> int:
    """Bytes of weights one decoding step reads: every distinct parameter once (tied embeddings
    are read once, by the output projection; the input lookup reads one row)."""
    seen, total = set(), 0
    for parameter in model.parameters():
        if parameter.data_ptr() in seen:
            continue
        seen.add(parameter.data_ptr())
        total += parameter.numel() * parameter.element_size()
    return total


def copy_bandwidth(device, *, mbytes: int = 512, repeats: int = 5, threads: int = 0) -> float:
    """Bytes/s copied from a large tensor to another (its size ÷ the copy's time; the memory
    traffic is twice that: each byte is read and written), best of `repeats`; on `threads`
    torch threads when given (the machine's limit, whatever count the engine chose). In a
    passing thread: OpenMP helpers left on this one would slow the engine measured next
    (`bot.engine.threads.in_passing_thread`)."""
    return in_passing_thread(
        _copy_bandwidth, device, mbytes=mbytes, repeats=repeats, threads=threads
    )


def _copy_bandwidth(device, *, mbytes: int, repeats: int, threads: int) -> float:
    import torch

    if threads:
        torch.set_num_threads(threads)

    source = torch.ones(mbytes * 2**20 // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        target.copy_(source)
        _sync(device)
        best = min(best, time.perf_counter() - started)
    return source.numel() * 4 / best


def _sync(device) -> None:
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        torch.cuda.synchronize()


def median(values) -> float:
    return statistics.median(list(values))


def make_engine(loaded, n: int, batch_size: int = 8, tune_threads: bool = True) -> AnswerEngine:
    """An engine as the bot builds it (thread tuning on, as `Settings` defaults)."""
    return AnswerEngine(
        loaded,
        system_prompt=DEFAULT_SYSTEM_PROMPT,
        max_input_tokens=1024,
        max_new_tokens=n,
        batch_size=batch_size,
        generate_options={"min_new_tokens": n},
        tune_threads=tune_threads,
    )


def decode_speed(engine, *, questions, timeout=600) -> float:
    """Median batch-1 decode tokens/s (prefill excluded) over `questions`, one at a time."""
    results = [engine.answer(q, timeout=timeout) for q in questions]
    return median(r.timings.tokens_per_s for r in results)


def generate_speed(loaded, *, n: int, questions) -> float:
    """`_generate_speed` in a passing thread (see `copy_bandwidth`)."""
    return in_passing_thread(_generate_speed, loaded, n=n, questions=questions)


def _generate_speed(loaded, *, n: int, questions) -> float:
    """Batch-1 decode tokens/s of plain `model.generate` (prefill timed apart and subtracted)."""
    import torch

    from bot.engine.prompt import encode_prompt

    speeds = []
    for question in questions:
        ids = encode_prompt(
            loaded.tokenizer,
            AnswerRequest(question),
            system_prompt=DEFAULT_SYSTEM_PROMPT,
            max_input_tokens=1024,
        ).input_ids
        inputs = torch.tensor([ids], device=loaded.device)
        options = dict(do_sample=False, pad_token_id=loaded.tokenizer.pad_token_id)
        with torch.inference_mode():
            started = time.perf_counter()
            loaded.model.generate(inputs, max_new_tokens=1, min_new_tokens=1, **options)
            prefill = time.perf_counter() - started
            started = time.perf_counter()
            loaded.model.generate(inputs, max_new_tokens=n, min_new_tokens=n, **options)
            total = time.perf_counter() - started
        speeds.append((n - 1) / (total - prefill))
    return median(speeds)


def concurrency(engine, *, repeats: int) -> dict:
    single, together, same = [], [], []
    for _ in range(repeats):
        alone = []
        for question in QUESTIONS:
            started = time.perf_counter()
            alone.append(engine.answer(question, timeout=600))
            single.append(time.perf_counter() - started)
        started = time.perf_counter()
        futures = [engine.submit(question) for question in QUESTIONS]
        wait(futures, timeout=900)
        together.append(time.perf_counter() - started)
        same.append(sum(f.result().text == a.text for f, a in zip(futures, alone, strict=True)))
    return {
        "single_s": median(single),
        "eight_s": median(together),
        "ratio": median(together) / median(single),
        "equal_answers": min(same),
    }


def late_arrival(engine, *, n: int, repeats: int) -> dict:
    """A short question arriving while a long one decodes: its latency ÷ its latency alone."""
    short = AnswerRequest(QUESTIONS[1], max_new_tokens=max(4, n // 4))
    alone, joined, waited_for_whole = [], [], []
    for _ in range(repeats):
        started = time.perf_counter()
        engine.answer(short, timeout=600)
        alone.append(time.perf_counter() - started)
        arrived: dict = {}
        trigger = threading.Event()

        def on_partial(text, trigger=trigger):
            if len(text.split()) >= 3:
                trigger.set()

        long_future = engine.submit(
            AnswerRequest(QUESTIONS[0], max_new_tokens=n * 2), on_partial=on_partial
        )
        trigger.wait(600)
        arrived["t"] = time.perf_counter()
        short_result = engine.submit(short).result(timeout=600)
        joined.append(time.perf_counter() - arrived["t"])
        waited_for_whole.append(not long_future.done() or short_result is None)
        long_future.result(timeout=600)
    return {
        "alone_s": median(alone),
        "joined_s": median(joined),
        "ratio": median(joined) / median(alone),
        "finished_before_long_one": sum(waited_for_whole),
    }


def adapter_overhead(loaded, engine, folder: Path, *, n: int, repeats: int) -> dict:
    """Per-token time: merged adapter ÷ base; PEFT unmerged too (see `peft_unmerged_overhead`).

    Each round times the base and the merged adapter side by side, taking turns going first,
    and the figure is the median of the rounds' ratios (at least 5 rounds). It was the ratio of
    3 medians with the base always first, and the same code gave 1.08 in one run_all and 1.02
    and 0.98 in the two runs after it (AVX-512 EPYC, 6 Dec 2026): the machine's noise.
    """
    base, merged, ratios = [], [], []
    for round_ in range(max(repeats, 5)):
        times: dict = {}
        for version in (None, "v0001") if round_ % 2 == 0 else ("v0001", None):
            engine.set_adapter(version, folder if version else None).result(timeout=600)
            times[version] = 1 / decode_speed(engine, questions=QUESTIONS[:3])
        base.append(times[None])
        merged.append(times["v0001"])
        ratios.append(times["v0001"] / times[None])
    engine.set_adapter(None, None).result(timeout=600)
    return {
        "base_ms": 1000 * median(base),
        "merged_ms": 1000 * median(merged),
        "ratio": median(ratios),
        "ratios": ratios,
    }


def peft_unmerged_overhead(loaded, folder: Path, *, n: int) -> dict:
    """`model.generate` per-token time with an unmerged PEFT adapter ÷ without (reference)."""
    from peft import PeftModel

    base = 1 / generate_speed(loaded, n=n, questions=QUESTIONS[:3])
    peft_model = PeftModel.from_pretrained(loaded.model, str(folder))
    peft_model.eval()
    wrapped = type(loaded)(**{**loaded.__dict__, "model": peft_model})
    try:
        unmerged = 1 / generate_speed(wrapped, n=n, questions=QUESTIONS[:3])
    finally:
        peft_model.unload()  # the layers come out again: the base is clean for what follows
    return {"ratio": unmerged / base}


def swaps_under_load(
    engine, folders: list[Path], *, questions: int, swaps: int, repeats: int = 5
) -> dict:
    """`questions` questions with `swaps` swaps among them, against the same run without swaps;
    `repeats` rounds of the three runs, the median of the rounds' ratios."""
    requests = [AnswerRequest(QUESTIONS[i % len(QUESTIONS)]) for i in range(questions)]
    every = questions // swaps

    def run(with_swaps: bool) -> tuple[float, list, list, list]:
        engine.set_adapter(None, None).result(timeout=600)
        engine.answer("settle", timeout=600)  # the swap back to the base is not timed
        futures, expected, swap_futures, version = [], [], [], None
        started = time.perf_counter()
        for index, request in enumerate(requests):
            if with_swaps and index % every == every - 1 and len(swap_futures) < swaps:
                version = f"v{len(swap_futures) % 2 + 1:04d}"
                folder = folders[len(swap_futures) % 2]
                swap_futures.append(engine.set_adapter(version, folder))
            futures.append(engine.submit(request))
            expected.append(version)
        wait(futures + swap_futures, timeout=1800)
        elapsed = time.perf_counter() - started
        return elapsed, futures, expected, swap_futures

    # the engine's way (rows of the old version decode beside the new one) and, for reference,
    # draining the batch at each swap. Each round times the run without swaps beside the two
    # with: a ratio is taken within a round, so that the drift of a shared machine over minutes
    # hits both sides of it alike, and the plain and swapped runs take turns going first
    mixed = engine.mix_versions
    times: dict[str, list[float]] = {"drained": [], "plain": [], "swapped": []}
    swapping = []
    failed = wrong = duplicates = 0
    for index in range(repeats):
        engine.mix_versions = False
        times["drained"].append(run(True)[0])
        engine.mix_versions = mixed
        for swaps_now in (False, True) if index % 2 == 0 else (True, False):
            if not swaps_now:
                times["plain"].append(run(False)[0])
                continue
            elapsed, futures, expected, swap_futures = run(True)
            times["swapped"].append(elapsed)
            swapping.append(sum(f.result() for f in swap_futures if f.exception() is None))
            failed += sum(f.exception() is not None for f in futures)
            results = [f.result() for f in futures if f.exception() is None]
            wrong += sum(r.adapter_version != v for r, v in zip(results, expected, strict=False))
            duplicates += len(results) - len({id(r) for r in results})
    ratios = [p / s for p, s in zip(times["plain"], times["swapped"], strict=True)]
    drained = [p / d for p, d in zip(times["plain"], times["drained"], strict=True)]
    extra = median(times["swapped"]) - median(times["plain"])
    engine.set_adapter(None, None).result(timeout=600)
    answered = engine.stats()["answered"]
    return {
        "failed": failed,
        "wrong_version": wrong,
        "duplicates": duplicates,
        "runs": repeats,
        # the median of the rounds' ratios, and each round's
        "throughput_ratio": median(ratios),
        "throughput_ratios": ratios,
        "drained_throughput_ratio": median(drained),
        "seconds": times,
        # of the extra wall time, the part the worker spent swapping (reading, merging)
        "swapping_share_of_extra": median(swapping) / extra if extra > 0 else None,
        "answered_total": answered,
    }


PARTS = ["decode", "concurrency", "adapter", "swaps", "memory"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--swap-questions", type=int, default=50)
    parser.add_argument("--swaps", type=int, default=10)
    parser.add_argument(
        "--swap-repeats", type=int, default=5,
        help="rounds of the swaps part (each: drained, plain and swapped runs; ~40 s a round)",
    )  # fmt: skip
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
        help="the weights' dtype (APPRENTICE_SERVE_DTYPE); auto: bf16 on CUDA, float32 on a CPU",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    parser.add_argument(
        "--only", nargs="+", choices=PARTS, default=PARTS, help="measure these parts only"
    )
    parser.add_argument("--memory-probe", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    only = set(args.only)
    if args.memory_probe:
        memory_probe(args.memory_probe, device=args.device, dtype=args.dtype)
        return

    import torch

    cache_dir = Settings(_env_file=None).model_cache_dir
    loaded = load_base_model(
        DEFAULT_BASE_MODEL, device=args.device, cache_dir=cache_dir, dtype=args.dtype
    )
    n = args.new_tokens
    out: dict = {
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "new_tokens": n,
    }
    weights = weight_bytes(loaded.model)
    out["weight_bytes"] = weights
    print(f"{DEFAULT_BASE_MODEL} on {loaded.device}: {weights / 1e6:.0f} MB of weights", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        folders = [
            in_passing_thread(  # PEFT's torch work: not on this long-lived thread
                make_random_adapter,
                cache_dir=cache_dir,
                folder=Path(tmp) / f"v000{i}",
                seed=i,
                threads=0,
            )
            for i in (1, 2)
        ]
        with make_engine(loaded, n) as engine:
            engine.answer("warm up", timeout=600)
            if "decode" in only:
                out["decode"] = decode_efficiency(
                    loaded, engine, weights=weights, n=n, repeats=args.repeats
                )
                print("decode", out["decode"], flush=True)
            if "concurrency" in only:
                out["concurrency"] = concurrency(engine, repeats=args.repeats)
                print("concurrency", out["concurrency"], flush=True)
                out["late_arrival"] = late_arrival(engine, n=n, repeats=args.repeats)
                print("late arrival", out["late_arrival"], flush=True)
            if "adapter" in only:
                out["adapter"] = adapter_overhead(
                    loaded, engine, folders[0], n=n, repeats=args.repeats
                )
                print("adapter", out["adapter"], flush=True)

        if "swaps" in only and only & {"decode", "adapter"}:
            # a fresh process, as the bot starts (the cause of the slower steps measured after
            # plain generate or PEFT here: OpenMP teams left on this thread; now in passing
            # threads, see bot.engine.threads.in_passing_thread)
            out["swaps"] = _fresh_process_part("swaps", args)
            print("swaps (fresh process)", out["swaps"], flush=True)
        elif "swaps" in only:
            with make_engine(loaded, 16) as engine:
                engine.answer("warm up", timeout=600)
                out["swaps"] = swaps_under_load(
                    engine,
                    folders,
                    questions=args.swap_questions,
                    swaps=args.swaps,
                    repeats=args.swap_repeats,
                )
                print("swaps", out["swaps"], flush=True)
        if "memory" in only:
            probe = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--memory-probe",
                    str(folders[0]),
                    "--device",
                    args.device,
                    "--dtype",
                    args.dtype,
                ],
                capture_output=True,
                text=True,
                timeout=1200,
                check=True,
            )
            memory = json.loads(probe.stdout.strip().splitlines()[-1])
            out["memory"] = {**memory, "ratio": memory["rss_bytes"] / weights}
            print("memory", out["memory"], flush=True)

        if "adapter" in only:
            out["adapter"]["peft_unmerged_ratio"] = in_passing_thread(
                peft_unmerged_overhead, loaded, folders[0], n=n
            )["ratio"]
            print("peft unmerged", out["adapter"]["peft_unmerged_ratio"], flush=True)

    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


def _fresh_process_part(part: str, args) -> dict:
    """Measure `part` alone in a child process of this script, with the same options."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "part.json"
        command = [
            *(sys.executable, __file__, "--only", part, "--json", str(out)),
            *("--repeats", str(args.repeats), "--new-tokens", str(args.new_tokens)),
            *("--swap-questions", str(args.swap_questions), "--swaps", str(args.swaps)),
            *("--swap-repeats", str(args.swap_repeats)),
            *("--device", args.device, "--dtype", args.dtype),
        ]
        subprocess.run(command, timeout=3600, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())[part]


def memory_probe(folder: Path, *, device: str, dtype: str) -> None:
    """In a fresh process, as the bot serves: the cached model, an engine with an adapter
    merged, eight questions at once and one alone; print the resident and peak memory."""
    cache_dir = Settings(_env_file=None).model_cache_dir
    loaded = load_base_model(DEFAULT_BASE_MODEL, device=device, cache_dir=cache_dir, dtype=dtype)
    with make_engine(loaded, 32) as engine:
        engine.set_adapter("v0001", folder).result(timeout=600)
        wait([engine.submit(question) for question in QUESTIONS], timeout=900)
        engine.answer("one more with the adapter", timeout=600)
        print(json.dumps({"rss_bytes": rss_bytes(), "peak_rss_bytes": rss_bytes("VmHWM")}))


def decode_efficiency(loaded, engine, *, weights: int, n: int, repeats: int) -> dict:
    """Batch-1 tokens/s ÷ the memory-bandwidth limit; bandwidth and speed interleaved, so the
    same noise hits both. Plain `generate` beside it, for reference."""
    import torch

    threads = torch.get_num_threads()
    bandwidths, engine_speeds, generate_speeds = [], [], []
    for _ in range(repeats):
        bandwidths.append(copy_bandwidth(loaded.device, threads=threads))
        engine_speeds.append(decode_speed(engine, questions=QUESTIONS[:3]))
    for _ in range(max(1, repeats // 2)):
        generate_speeds.append(generate_speed(loaded, n=n, questions=QUESTIONS[:2]))
    bandwidth = median(bandwidths)  # bytes copied ÷ time
    limit = bandwidth / weights
    return {
        "bandwidth_gbs": bandwidth / 1e9,
        "limit_tps": limit,
        "engine_tps": median(engine_speeds),
        "generate_tps": median(generate_speeds),
        "ratio": median(engine_speeds) / limit,
        "generate_ratio": median(generate_speeds) / limit,
        # counting both the bytes read and those written by the copy, as STREAM's copy does:
        # twice the bandwidth, every ratio halved
        "read_write_ratio": median(engine_speeds) / (2 * limit),
        "generate_read_write_ratio": median(generate_speeds) / (2 * limit),
    }


if __name__ == "__main__":
    main()
