"""Where a decoding step's time goes: our engine's step against plain `model.generate`.

    python bench/profile_decode.py [--tokens 24] [--threads 1,2] [--batches 1,8]

For each thread count and batch size it times the decode steps of our loop (`DecodeBatch.step`
plus the greedy choice, as the worker runs them) and of `model.generate` (prefill subtracted),
interleaved so the same machine noise hits both, and then profiles the same steps with
`torch.profiler` and sorts every operator's own (self) CPU time into:

- matmul (weights): the linear layers' matrix products, the vocabulary projection apart;
- vocab projection: `lm_head`, the largest single matmul (49k words x 576);
- attention: the attention kernel itself (scaled dot product);
- elementwise: RMSNorm, RoPE, SiLU, residual adds, views (what is left inside the model);
- masks: building the causal / padding mask for the step;
- cache: the KV cache update and our batch bookkeeping (mask column, positions, row removal);
- sampling: choosing the token (argmax, blocked tokens, generate's logits processors and
  stopping criteria);
- python / dispatch: wall time of the profiled steps minus every operator's self time: module
  calls, decorators, transformers' argument handling, the dispatcher, waiting for threads.

Figures are ms per decoding step (one token per row). The profiler adds its own overhead, so the
profiled wall time is longer than the plain one; the shares are what to read. Absolute times
depend on what else runs on the machine: compare the columns of one run, never two runs.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CATEGORIES = [
    "matmul (weights)",
    "vocab projection",
    "attention",
    "elementwise",
    "masks",
    "cache",
    "sampling",
    "python / dispatch",
]
LABELS = {"masks", "cache", "sampling", "vocab projection"}  # record_function scopes we add


def _labelled(function, label):
    from torch.profiler import record_function

    def wrapper(*args, **kwargs):
        with record_function(label):
            return function(*args, **kwargs)

    wrapper.__wrapped__ = function
    return wrapper


@contextlib.contextmanager
def labelled_scopes(model):
    """Wrap the functions whose time we want named (mask building, cache, sampling, lm_head)."""
    import importlib

    from transformers import generation
    from transformers.cache_utils import DynamicLayer

    import bot.engine.decoding as decoding

    modeling = importlib.import_module(type(model).__module__)
    patches = [
        (modeling, "create_causal_mask", "masks"),
        (DynamicLayer, "update", "cache"),
        (decoding.DecodeBatch, "keep", "cache"),
        (decoding.DecodeBatch, "_merge", "cache"),
        (decoding, "greedy", "sampling"),
        (generation.LogitsProcessorList, "__call__", "sampling"),
        (generation.StoppingCriteriaList, "__call__", "sampling"),
    ]
    saved = []
    for owner, name, label in patches:
        if hasattr(owner, name):
            original = getattr(owner, name)
            saved.append((owner, name, original))
            setattr(owner, name, _labelled(original, label))
    head = model.get_output_embeddings()
    head_forward = head.forward
    head.forward = _labelled(head_forward, "vocab projection")
    try:
        yield
    finally:
        head.forward = head_forward
        for owner, name, original in saved:
            setattr(owner, name, original)


def categorize(events, wall_us: float) -> dict[str, float]:
    """Self CPU time (us) per category; what no operator accounts for is python / dispatch."""
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for event in events:
        if event.name in LABELS or not event.name.startswith("aten::"):
            continue
        label, parent = None, event.cpu_parent
        while parent is not None:
            if parent.name in LABELS:
                label = parent.name
                break
            parent = parent.cpu_parent
        name = event.name
        if label is None:
            if name in {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}:
                label = "matmul (weights)"
            elif "scaled_dot_product" in name or name in {"aten::_softmax", "aten::softmax"}:
                label = "attention"
            else:
                label = "elementwise"
        totals[label] += event.self_cpu_time_total
    totals["python / dispatch"] = max(0.0, wall_us - sum(totals.values()))
    return totals


def prompts_for(loaded, count: int) -> list[list[int]]:
    from bench.serving_bench import QUESTIONS
    from bot.engine.prompt import encode_prompt
    from bot.engine.types import AnswerRequest
    from bot.settings import DEFAULT_SYSTEM_PROMPT

    return [
        encode_prompt(
            loaded.tokenizer,
            AnswerRequest(QUESTIONS[i % len(QUESTIONS)]),
            system_prompt=DEFAULT_SYSTEM_PROMPT,
            max_input_tokens=1024,
        ).input_ids
        for i in range(count)
    ]


def engine_steps(
    loaded, prompts, *, steps: int, prefix, around=contextlib.nullcontext
) -> tuple[float, list[list[int]]]:
    """Seconds per decode step of our loop (prefill excluded) and the tokens it chose.

    `around()` is entered for the decode steps only (the profiler)."""
    import torch

    from bot.engine.decoding import DecodeBatch, greedy

    batch = DecodeBatch(loaded.model, pad_id=loaded.tokenizer.pad_token_id, device=loaded.device)
    batch.set_prefix(prefix)
    chosen = []
    with torch.inference_mode():
        batch.tokens = greedy(batch.join(prompts, list(range(len(prompts)))))
        with around():
            started = time.perf_counter()
            for _ in range(steps):
                batch.tokens = greedy(batch.step(batch.tokens))
                chosen.append(batch.tokens.tolist())
            elapsed = time.perf_counter() - started
    return elapsed / steps, chosen


def generate_steps(
    loaded, prompts, *, steps: int, around=contextlib.nullcontext
) -> tuple[float, list[list[int]]]:
    """Seconds per decode step of `model.generate` (a 1-token run subtracted: the prefill).

    `around(prefill)` is entered for each of the two runs (the profiler)."""
    import torch

    width = max(len(ids) for ids in prompts)
    pad = loaded.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=loaded.device)
    mask = torch.tensor(
        [[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=loaded.device
    )
    options = dict(do_sample=False, pad_token_id=pad, attention_mask=mask)
    with torch.inference_mode():
        with around(True):
            started = time.perf_counter()
            loaded.model.generate(ids, max_new_tokens=1, min_new_tokens=1, **options)
            prefill = time.perf_counter() - started
        with around(False):
            started = time.perf_counter()
            out = loaded.model.generate(
                ids, max_new_tokens=steps + 1, min_new_tokens=steps + 1, **options
            )
            total = time.perf_counter() - started
    chosen = out[:, width + 1 :].T.tolist()
    return (total - prefill) / steps, chosen


class Profiled:
    """Profiles each `with` block; keeps each block's categories (self us) and wall time."""

    def __init__(self):
        self.blocks: list[dict[str, float]] = []

    @contextlib.contextmanager
    def __call__(self, *_):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            started = time.perf_counter()
            yield
            wall = time.perf_counter() - started
        self.blocks.append(categorize(prof.events(), wall * 1e6))


def measure(loaded, *, threads: int, batch: int, steps: int, repeats: int, prefix) -> dict:
    """Run in a fresh thread (as the engine worker does) with `threads` torch threads."""
    import torch

    out: dict = {}

    def body():
        torch.set_num_threads(threads)
        prompts = prompts_for(loaded, batch)
        engine_steps(loaded, prompts, steps=4, prefix=prefix)  # warm up
        ours, plain = [], []
        for _ in range(repeats):
            seconds, ours_tokens = engine_steps(loaded, prompts, steps=steps, prefix=prefix)
            ours.append(seconds)
            seconds, plain_tokens = generate_steps(loaded, prompts, steps=steps)
            plain.append(seconds)
        out["ours_ms"] = 1000 * statistics.median(ours)
        out["generate_ms"] = 1000 * statistics.median(plain)
        out["same_tokens"] = ours_tokens == plain_tokens
        with labelled_scopes(loaded.model):
            ours_prof, plain_prof = Profiled(), Profiled()
            engine_steps(loaded, prompts, steps=steps, prefix=prefix, around=ours_prof)
            generate_steps(loaded, prompts, steps=steps, around=plain_prof)
        (decode,) = ours_prof.blocks
        out["ours_profile"] = {k: v / 1000 / steps for k, v in decode.items()}
        prefill, full = plain_prof.blocks  # generate's decode steps: the full run less prefill
        out["generate_profile"] = {
            k: max(0.0, full[k] - prefill[k]) / 1000 / steps for k in CATEGORIES
        }

    worker = threading.Thread(target=body)
    worker.start()
    worker.join()
    return out


def print_table(key: str, result: dict) -> None:
    ours, plain = result["ours_profile"], result["generate_profile"]
    print(f"\n### {key}")
    ratio = result["ours_ms"] / result["generate_ms"]
    print(
        f"plain timing, ms per step: ours {result['ours_ms']:.1f}, generate "
        f"{result['generate_ms']:.1f} (ours ÷ generate {ratio:.2f}; "
        f"same tokens: {result['same_tokens']})"
    )
    print("| where (profiled, ms per step) | ours | share | generate | share |")
    print("| --- | ---: | ---: | ---: | ---: |")
    ours_total, plain_total = sum(ours.values()), sum(plain.values())
    for name in CATEGORIES:
        print(
            f"| {name} | {ours[name]:.2f} | {ours[name] / ours_total:.0%} | "
            f"{plain[name]:.2f} | {plain[name] / plain_total:.0%} |"
        )
    print(f"| total (profiled wall) | {ours_total:.2f} | | {plain_total:.2f} | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=24, help="decode steps per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default="", help="comma-separated; default: torch's")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument(
        "--row-kernels", action="store_true",
        help="compute the linear layers as the engine's worker may (bot.engine.kernels); "
        "both loops then use them",
    )  # fmt: skip
    args = parser.parse_args()

    import torch

    from bot.engine.loading import load_from_settings
    from bot.engine.worker import AnswerEngine
    from bot.settings import Settings

    settings = Settings(_env_file=None)
    loaded = load_from_settings(settings)
    prefix = AnswerEngine.from_settings(settings, loaded=loaded)._shared_prefix()
    if args.row_kernels:
        from bot.engine import kernels, skinny

        kernels.install(loaded.model, library=skinny.load())  # weight on the left without it
    thread_counts = [int(t) for t in args.threads.split(",") if t] or [torch.get_num_threads()]
    print(f"{settings.base_model} on {loaded.device} ({loaded.dtype}), torch {torch.__version__}")
    for threads in thread_counts:
        for batch in (int(b) for b in args.batches.split(",")):
            result = measure(
                loaded,
                threads=threads,
                batch=batch,
                steps=args.tokens,
                repeats=args.repeats,
                prefix=prefix,
            )
            print_table(f"batch {batch}, {threads} thread(s)", result)


if __name__ == "__main__":
    main()
