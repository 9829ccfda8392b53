"""Benchmark the answer engine on the real default model (SmolLM2-135M-Instruct).

    python bench/engine_bench.py [--fresh-cache DIR] [--new-tokens 48] [--threads 0]

Measures: base-model load time (the GGUF conversion, when the cache is absent or with
`--fresh-cache`, then the cached load), batch-1 decode speed, the wall time of 8 concurrent
questions divided by that of one, and the time to hot-swap a LoRA adapter (made here at random
with the project's fixed LoRA configuration). Answers are forced to the same length
(`min_new_tokens = max_new_tokens`) so the batched and the single runs do the same work.
Prints a markdown table. A script, not a test: it takes a minute or two on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import wait
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bot.engine.loading import load_base_model  # noqa: E402
from bot.engine.worker import AnswerEngine  # noqa: E402
from bot.settings import DEFAULT_BASE_MODEL, DEFAULT_SYSTEM_PROMPT, Settings  # noqa: E402

TOPICS = ["deploys", "on-call", "releases", "backups", "billing", "alerts", "access", "laptops"]


def make_random_adapter(*, cache_dir: Path, folder: Path, seed: int, threads: int) -> Path:
    """A LoRA adapter with the fixed config (all-linear, r=8) and random lora_B weights."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = load_base_model(
        DEFAULT_BASE_MODEL, device="cpu", cache_dir=cache_dir, threads=threads
    ).model
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)
    peft_model.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fresh-cache", type=Path, help="convert into this (empty) cache folder")
    parser.add_argument("--new-tokens", type=int, default=48, help="tokens per answer, forced")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = default")
    args = parser.parse_args()

    cache_dir = args.fresh_cache or Settings(_env_file=None).model_cache_dir
    rows: list[tuple[str, str]] = []

    def load():
        return load_base_model(
            DEFAULT_BASE_MODEL, device="auto", cache_dir=cache_dir, threads=args.threads
        )

    loaded = load()
    if not loaded.from_cache:
        rows.append(("load, first run (GGUF → safetensors cache)", f"{loaded.load_s:.1f} s"))
        print(f"first load (conversion): {loaded.load_s:.1f} s", flush=True)
        del loaded
        loaded = load()
    rows.append(("load, cached", f"{loaded.load_s:.2f} s"))
    print(f"cached load: {loaded.load_s:.2f} s on {loaded.device} ({loaded.dtype})", flush=True)

    n = args.new_tokens
    questions = [f"In two sentences, how does our team handle {topic}?" for topic in TOPICS]
    engine = AnswerEngine(
        loaded,
        system_prompt=DEFAULT_SYSTEM_PROMPT,
        max_input_tokens=1024,
        max_new_tokens=n,
        batch_size=len(questions),
        generate_options={"min_new_tokens": n},
    )
    with engine, tempfile.TemporaryDirectory() as tmp:
        engine.answer("warm up", timeout=300)
        singles = [engine.answer(question, timeout=300) for question in questions]
        single_s = sum(result.timings.total_s for result in singles) / len(singles)
        speed = sum(result.timings.tokens_per_s for result in singles) / len(singles)
        prefill_ms = 1000 * sum(result.timings.prompt_s for result in singles) / len(singles)
        rows.append(("batch 1: decode speed (mean of 8)", f"{speed:.1f} tokens/s"))
        rows.append(("batch 1: prompt (prefill)", f"{prefill_ms:.0f} ms"))
        rows.append((f"batch 1: wall time, {n} tokens", f"{single_s:.2f} s"))
        print(f"batch 1: {speed:.1f} tokens/s, {single_s:.2f} s", flush=True)

        batches_before = engine.stats()["batches"]
        started = time.perf_counter()
        futures = [engine.submit(question) for question in questions]
        wait(futures, timeout=600)
        batched_s = time.perf_counter() - started
        results = [future.result() for future in futures]
        total_tokens = sum(result.timings.new_tokens for result in results)
        same = sum(b.text == s.text for b, s in zip(results, singles, strict=True))
        rows.append((f"8 concurrent: wall time, {n} tokens each", f"{batched_s:.2f} s"))
        rows.append(("8 concurrent ÷ 1 (wall time)", f"{batched_s / single_s:.2f}×"))
        rows.append(("8 concurrent: throughput", f"{total_tokens / batched_s:.1f} tokens/s"))
        rows.append(("8 concurrent: batches used", str(engine.stats()["batches"] - batches_before)))
        rows.append(("batched answers == single answers", f"{same} of {len(results)}"))
        print(f"8 concurrent: {batched_s:.2f} s", flush=True)

        folders = [
            make_random_adapter(
                cache_dir=cache_dir, folder=Path(tmp) / f"v000{i}", seed=i, threads=args.threads
            )
            for i in (1, 2)
        ]
        first = engine.set_adapter("v0001", folders[0]).result(timeout=300)
        second = engine.set_adapter("v0002", folders[1]).result(timeout=300)
        to_base = engine.set_adapter(None, None).result(timeout=300)
        size_mb = (folders[0] / "adapter_model.safetensors").stat().st_size / 1e6
        rows.append((f"adapter swap: first (wrap base, {size_mb:.1f} MB)", f"{first:.3f} s"))
        rows.append(("adapter swap: next version (load + set + delete)", f"{second:.3f} s"))
        rows.append(("adapter swap: back to the base model", f"{to_base * 1e6:.0f} µs"))
        print(f"swaps: {first:.3f} s, {second:.3f} s, {to_base * 1e6:.0f} µs", flush=True)

    import torch

    print()
    print(
        f"SmolLM2-135M-Instruct, {loaded.device} {str(loaded.dtype).removeprefix('torch.')}, "
        f"{torch.get_num_threads()} torch threads, greedy, {n} new tokens per answer"
    )
    print()
    print("| measure | value |")
    print("| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
