"""Run every benchmark and write bench/RESULTS.md: one table of ratios against the goals.

    python bench/run_all.py            # everything, real default model (~10-20 min on 2 cores)
    python bench/run_all.py --quick    # fewer repeats, ack burst on the tiny model, no cycle

Each benchmark runs in its own process (so memory and torch threads are its own) and every
figure is a ratio of two things measured side by side in that run: these machines are shared
and noisy, absolute times are not comparable between runs. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"

# What limits a goal that is missed, and what would move it (from profiles on this machine).
LIMITS = {
    "concurrency": (
        "float32: the skinny kernel (bot/engine/skinny.cpp) computes a step's rows reading each "
        "weight once (one pass over a weight group serves 8 rows), each layer of a step is one "
        "kernel call (skinny_decode_layer), and prefills go through it in a shape measured for "
        "their row counts (kernels.measure_shapes; on the AVX-512 EPYC 4x6 ran a prefill of 18 "
        "and 147 tokens in 0.72 and 0.85 of 3x8's time). The ratio moves with the memory "
        "bandwidth the shared machine leaves: on the AVX-512 EPYC (6 Dec) 8 answers took "
        "1.4-1.5x one while a 1-row step took 14-15 ms (memory-bound, the machine busy), and "
        "1.6-1.9x while it took ~10 ms (a quiet machine, ~54 GB/s), because the 8-row step "
        "stays at 12-16 ms: inside the layer step its products cost 1.3-1.9x their 1-row pass "
        "(down_proj the most) and attention reads 8 rows' caches (+1 ms a step); the 8 tails' "
        "prefill (147 tokens, ~120 ms) is compute. Tried there without gain for the 8-row "
        "step: the shapes 4x6 and 5x5 (14.4 and 16.6 ms against 12.2-13.1), 6x4 or 3x4 for "
        "down_proj alone, prefetching 2-4 groups ahead or into L2. Weights copied into huge "
        "pages (loading.own_weights, adopted 6 Dec) run a step in ~0.92 of its time at 1 row "
        "and at 8. On an AVX-512 Xeon (6 Dec) 1.52x, once a tie between the "
        "kernel and MKL at 1-2 rows went to the kernel (one question 28 -> 43 tokens/s): its "
        "8-row layer calls take 1.38x the 1-row ones (24.8 against 18.0 ms; 4x6 and 5x5 "
        "slower) and the 8 tails' prefill (160 tokens through MKL, ~190 ms) is a third of the "
        "difference. Earlier machines: 1.29-1.37x (AVX2 EPYC), 1.36-1.47x "
        "(Xeon). int8 weights, more cores or a GPU would move it. bf16: 1.40x on the Xeon, 2.1x "
        "on the AVX2 EPYC, 1.56-1.77x on the AVX-512 EPYC while its steps ran torch's ops "
        "between the products; since each layer of a bf16 step is one kernel call too (6 Dec), "
        "its single question got 1.7x faster, and this ratio, which divides by it, went to "
        "1.54-1.58x on an AVX-512 Xeon with AMX: the 8 tails' prefill (~150 tokens) keeps "
        "torch's bf16 products (AMX; the kernel's were 4-7x slower there), and the kernel's "
        "8-row bf16 products cost 0.8 of F.linear's time against 0.6-0.7 at 1-4 rows"
    ),
    "decode": (
        "float32: the skinny kernel and the lean decoding step (bot/engine/decoding.py) read the "
        "weights at 14-26 GB/s at batch 1 (AVX2 EPYC / Xeon), at or above what a torch copy "
        "reaches (9-13 GB/s copied), so the ratio to the copy limit is 75-141 %; counted "
        "STREAM's way (the copy's reads and writes) 37-70 %. bf16: a step reads half the bytes, "
        "but what does not shrink with them weighs more: on the AVX2 EPYC a 1-row bf16 step "
        "took 52-57 ms, of which the products 34-37 (bf16 F.linear at one row: the kernel's "
        "widening lost by 5-26 % there), attention 4 and norms, RoPE and Python ~16 ms; "
        "20.9 tokens/s against 15.6 in float32 (58 %). On the Xeon 68-86 % (24.3 tokens/s "
        "against 23.2 in float32 on 6 Dec, 37.2 against 33.7 on 29 Nov): attention, norms, "
        "RoPE and the Python around each product (~13 us a layer, ~2.7 ms a step there) do "
        "not shrink with the weights. On an AVX-512 EPYC (6 Dec) memory is faster than the "
        "step: its torch copy measured "
        "15.5 and 26.6 GB/s copied in two runs an hour apart, while a batch-1 step (~33 ms) "
        "spends ~23 ms in the products (the kernel over the weights alone: 23 GB/s read) and "
        "~10 in attention, norms, RoPE and the Python around 211 products, which no bandwidth "
        "moves: 61-101 % of the limit, bf16 40-59 %. Each layer is now one kernel call "
        "(skinny_decode_layer: norms, products, RoPE, cache write, attention, SiLU in one "
        "parallel region): a batch-1 step takes ~25 ms, of which the layers' products 18 and "
        "lm_head 4.5; 74-123 % of the limit (38.5-41 tokens/s against a copy of 17.5-27.9 GB/s). "
        "bf16 kept the torch ops between the products then (36-54 % there); since 6 Dec its "
        "layers are one kernel call too (bf16 weights and cache, the stream float32): 73 "
        "against 43 tokens/s side by side on an AVX-512 Xeon with AMX, 140-145 % of a copy "
        "limit of 13-13.5 GB/s (float32 134 % in the same run: the torch copy understates what "
        "this machine gives a decoding stream)"
    ),
    "training": (
        "training and serving share 2 cores; the cycle's child runs at a lower priority and "
        "with fewer threads, but a decode step still competes for the cores and memory bandwidth"
    ),
    "adapter": (
        "noise between the runs of a round: merged weights make the same computation (the same "
        "code gave 1.08, 1.02, 0.98 and 1.03 in four runs on the AVX-512 EPYC, 6 Dec; rounds "
        "of one run spread 0.92-1.08)"
    ),
    "swaps": (
        "a swap applies between two steps and each row decodes on its own version (a per-row "
        "LoRA correction riding on the kernel as an extension of each weight row's dot "
        "product). Since 6 Dec the worker takes the whole queue, applies its swaps in order "
        "and admits the oldest waiting question first, then those on a version already in the "
        "batch (choose_admissions), and merges a batch of newcomers on one version at once: "
        "the run of 10 swaps in 50 questions (16-token answers) decodes 30 of its 105 steps "
        "corrected instead of all 105, and merges 3 times. What is left (AVX-512 EPYC, timers "
        "around the worker's methods, grouped against plain): the 3 merges (one pass over the "
        "weights each, 50-70 ms, about two 8-row steps: ~3-4 % of the run), the 2 batches that "
        "stay mixed (the first: 4 questions before any swap; the last: what is left) and their "
        "prefills, and the folder reads (~1 %); the other steps cost what plain ones do. "
        "Alternating in one process over 4 rounds, 16-token answers: 0.95 against 0.92 in "
        "queue order; 48-token answers 0.97 against 0.91. The figure moves by +-5 % between "
        "rounds on this shared machine (0.86-0.91 in four runs of this code, rounds 0.81-1.04); "
        "with answers this short a merge costs about what correcting a batch for its whole "
        "life does, so no merge rule moves it much. On an AVX-512 Xeon with AMX (6 Dec, 0.898 "
        "and 0.906 in two runs an hour apart) the extra time of a swapped run was merges +200 "
        "ms, corrected steps +185 ms (+14 % each), prefills +170 ms (the mixed batches' "
        "corrections; each version's shared prefix, ~145 ms, in the first round only) and "
        "folder reads 20 ms; a merge there is compute (a rank-16 update, 16 FMAs a weight: 37 "
        "ms through MKL against 17.5 ms for a read-and-write pass; a hand-written kernel took "
        "41 ms and was not kept). Before: every step corrected, 0.85-0.91 "
        "(AVX2 EPYC), 0.86-0.89 (Xeon), 0.87-0.95 (AVX-512 EPYC) over the sessions"
    ),
    "memory": (
        "torch's runtime (libtorch, MKL, the tokenizer, Python: 0.5-0.67 GB, the more on the "
        "AVX-512 Xeon) does not shrink with the weights: in bf16 the weights halve and the "
        "ratio grows (2.96x on the AVX2 EPYC, 3.51x on the Xeon, 3.14-3.80x on the AVX-512 "
        "EPYC, 3.87-3.97x on an AVX-512 Xeon with AMX) though the process is smaller; "
        "loading also peaks higher (float32 file cast to bf16)"
    ),
    "ack": "the listener threads share the 2 cores with the decoding engine",
}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    # the instruction set decides much (bf16 matmuls are native only with AVX512-BF16 / AMX)
    capability = torch.backends.cpu.get_cpu_capability()
    return (
        f"{cpu} ({capability}), {os.cpu_count()} cores{memory}, {gpu}; "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def run(command: list[str], *, timeout: float) -> tuple[int, str, float]:
    started = time.perf_counter()
    print("$", " ".join(command), flush=True)
    try:
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
        )
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        output, code = output + f"\n(timed out after {timeout:.0f} s)", -1
    elapsed = time.perf_counter() - started
    print(f"  exit {code} in {elapsed:.0f} s", flush=True)
    return code, output, elapsed


def _span(values) -> str:
    """'rounds 0.88-0.95' for a list of figures (a run's rounds), or '' without one."""
    return f"rounds {min(values):.2f}-{max(values):.2f}" if values else ""


def tail(text: str, lines: int = 6) -> str:
    return " / ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    python = sys.executable
    rows: list[tuple[str, str, str, str, bool | None]] = []  # id, measure, goal, figure, met
    raw: dict = {}

    with tempfile.TemporaryDirectory() as tmp:
        serving_json = Path(tmp) / "serving.json"
        repeats = "1" if args.quick else "3"
        code, output, _ = run(
            [python, "bench/serving_bench.py", "--repeats", repeats, "--json", str(serving_json)]
            + (
                ["--new-tokens", "16", "--swap-questions", "20", "--swap-repeats", "1"]
                if args.quick
                else ["--new-tokens", "32"]
            ),
            timeout=3600,
        )
        serving = json.loads(serving_json.read_text()) if serving_json.exists() else None
        if serving is None:
            raw["serving_error"] = tail(output)
    if serving:
        raw["serving"] = serving
        late, a, s = serving["late_arrival"], serving["adapter"], serving["swaps"]
        concurrency_row, decode_row, memory_row = dtype_rows(serving)
        rows += [
            concurrency_row,
            (
                "late",
                "1b. a question arriving mid-answer: its latency ÷ alone "
                f"(finished before the long answer: {late['finished_before_long_one']})",
                "joins at the next step",
                f"{late['ratio']:.2f}×",
                late["finished_before_long_one"] > 0,
            ),
            (
                "adapter",
                "2. per-token time, active adapter (merged) ÷ base model, the median of 5 "
                "rounds' ratios, each round's runs side by side (unmerged PEFT, for reference: "
                f"{a['peft_unmerged_ratio']:.2f}×)",
                "≤ 1.05×",
                f"{a['ratio']:.3f}× ({a['merged_ms']:.1f} ÷ {a['base_ms']:.1f} ms; "
                f"{_span(a.get('ratios'))})",
                a["ratio"] <= 1.05,
            ),
            decode_row,
            (
                "swaps",
                f"5. 10 swaps in a 50-question run ({s.get('runs', 1)} runs): failed / "
                "duplicated / wrong-version answers",
                "0",
                f"{s['failed']} / {s['duplicates']} / {s['wrong_version']}",
                s["failed"] == 0 and s["duplicates"] == 0 and s["wrong_version"] == 0,
            ),
            (
                "swaps",
                f"5b. throughput with 10 swaps ÷ without, the median of {s['runs']} rounds' "
                "ratios, each round's runs side by side (draining the batch at each swap, the "
                f"former way: {s['drained_throughput_ratio']:.2f})",
                "≥ 0.9",
                f"{s['throughput_ratio']:.2f} ({_span(s.get('throughput_ratios'))})",
                s["throughput_ratio"] >= 0.9,
            ),
            memory_row,
        ]
    else:
        rows.append(
            ("serving", "1-3, 5, 7 (serving_bench)", "", "failed: " + raw["serving_error"], None)
        )

    write(args.out, rows, raw, quick=args.quick)  # partial results survive a later failure
    rows += bf16_rows(python, raw, quick=args.quick)
    write(args.out, rows, raw, quick=args.quick)
    ack_command = [python, "bench/ack_bench.py"] + ([] if args.quick else ["--real"])
    code, output, _ = run(ack_command, timeout=1800)
    found = re.search(r"max ack / Slack's .* limit = ([0-9.]+)", output)
    worst = re.search(r"max ([0-9.]+) ms", output)
    raw["ack"] = tail(output, 4)
    rows.append(
        (
            "ack",
            "4. longest ack with 20 questions at once ÷ Slack's 3 s"
            + (" (tiny model)" if args.quick else " (real model serving)"),
            "≤ 0.1",
            f"{float(found.group(1)):.3f} (max {worst.group(1)} ms)" if found else "failed",
            float(found.group(1)) <= 0.1 if found else None,
        )
    )

    write(args.out, rows, raw, quick=args.quick)
    if args.quick:
        rows.append(("training", "6. serving p50 during a learning cycle ÷ idle", "≤ 1.5×",
                     "not measured (--quick)", None))  # fmt: skip
    elif (ROOT / "bench" / "cycle_bench.py").exists():
        code, output, _ = run([python, "bench/cycle_bench.py"], timeout=3600)
        found = re.search(r"p50 ratio \(during / idle\) \| ([0-9.]+)x", output)
        raw["cycle"] = tail(output, 14)
        rows.append(
            (
                "training",
                "6. serving p50 while a learning cycle trains ÷ idle p50 (bench/cycle_bench.py)",
                "≤ 1.5×",
                f"{float(found.group(1)):.2f}×" if found else "failed: " + tail(output, 3),
                float(found.group(1)) <= 1.5 if found else None,
            )
        )

    import torch

    rows.append(
        (
            "gpu",
            "8. the same scripts on CUDA (device auto, bf16)",
            "runs",
            "measured above (cuda)" if torch.cuda.is_available() else "not measured: no GPU lent",
            None,
        )
    )
    write(args.out, rows, raw, quick=args.quick)
    print(args.out.read_text())


def bf16_rows(python: str, raw: dict, *, quick: bool) -> list:
    """The same serving figures with `APPRENTICE_SERVE_DTYPE=bfloat16` (opt-in on a CPU)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bf16.json"
        command = [
            *(python, "bench/serving_bench.py", "--dtype", "bfloat16", "--json", str(out)),
            *("--only", "decode", "concurrency", "memory"),
            *("--repeats", "1" if quick else "3", "--new-tokens", "16" if quick else "32"),
        ]
        code, output, _ = run(command, timeout=3600)
        if not out.exists():
            return [("bf16", "bf16 serving (serving_bench --dtype bfloat16)", "",
                     "failed: " + tail(output), None)]  # fmt: skip
        b = json.loads(out.read_text())
    raw["serving_bf16"] = b
    return list(dtype_rows(b, label="(bf16) "))


def dtype_rows(serving: dict, *, label: str = "") -> tuple:
    """The rows one weight dtype decides: 8 at once, decode efficiency, memory."""
    c, d, m = serving["concurrency"], serving["decode"], serving["memory"]
    weights = serving["weight_bytes"]
    return (
        (
            "concurrency",
            f"1. {label}8 questions together ÷ one, wall time ({serving['new_tokens']} tokens "
            f"each; {c['equal_answers']}/8 answers equal to single)",
            "≤ 1.5×",
            f"{c['ratio']:.2f}× ({c['eight_s']:.1f} s ÷ {c['single_s']:.1f} s)",
            c["ratio"] <= 1.5,
        ),
        (
            "decode",
            f"3. {label}batch-1 tokens/s ÷ bandwidth limit (copy: {d['bandwidth_gbs']:.1f} "
            f"GB/s copied ÷ {weights / 1e6:.0f} MB = {d['limit_tps']:.1f} tok/s; plain generate "
            f"{d['generate_ratio']:.0%}; counting the copy's reads and writes, STREAM's way: "
            f"ours {d['read_write_ratio']:.0%}, generate {d['generate_read_write_ratio']:.0%})",
            "≥ 70 %",
            f"{d['ratio']:.0%} ({d['engine_tps']:.1f} tok/s)",
            d["ratio"] >= 0.70,
        ),
        (
            "memory",
            f"7. {label}RSS of a fresh process serving as the bot does (model + engine + "
            "adapter, 8 questions at once) ÷ weight bytes",
            "≤ 2.5×",
            f"{m['ratio']:.2f}× ({m['rss_bytes'] / 1e9:.2f} GB ÷ {weights / 1e9:.2f} GB)",
            m["ratio"] <= 2.5,
        ),
    )


def write(path: Path, rows, raw, *, quick: bool) -> None:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = "python bench/run_all.py" + (" --quick" if quick else "")
    lines = [
        "# Benchmark results",
        "",
        f"- machine: {machine()}",
        f"- date: {now}",
        f"- command: `{command}`",
        "- every figure is a ratio of two measurements taken side by side in this run "
        "(median of the repeats); the machine is shared, absolute times vary between runs",
        "",
        "| measure | goal | figure | met |",
        "| --- | --- | --- | --- |",
    ]
    for _, measure, goal, figure, met in rows:
        mark = "—" if met is None else ("met" if met else "**not met**")
        lines.append(f"| {measure} | {goal} | {figure} | {mark} |")
    missed = {key for key, *_, met in rows if met is False}
    if missed:
        lines += ["", "## What limits the goals not met", ""]
        lines += [f"- **{key}**: {LIMITS[key]}" for key in LIMITS if key in missed]
    lines += ["", "## Raw output", "", "```json", json.dumps(raw, indent=2), "```", ""]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
