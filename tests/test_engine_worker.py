"""The answer engine on a real (tiny) model: batching, streaming, timeouts, stop, adapter swaps.

The shared tiny model, freshly initialised, only repeats its last prompt token (a newline), so
every answer would be the empty string. These tests redraw its layer weights with a fixed seed
and a larger spread: still a real random model, now with answers that differ between questions
and between adapters. Workers are blocked on purpose with an `on_partial` callback that waits on
an event: that pins down "while a generation is in flight" without sleeping.
"""

from __future__ import annotations

import shutil
import threading
from concurrent.futures import Future
from pathlib import Path

import pytest

from bot.engine import worker as worker_module
from bot.engine.loading import load_base_model
from bot.engine.types import AnswerRequest, EngineError, EngineStopped, EngineTimeout
from bot.engine.worker import AnswerEngine

QUESTIONS = [
    "What is the capital of France?",
    "When do deploys go out?",
    "Who manages the on-call rotation?",
    "hello",
    "Ask an expert in the thread if the answer looks wrong.",
    "deploys tuesday noon",
    "What is 0123456789?",
    "PagerDuty platform team?",
]
WAIT = 60  # seconds; only a broken engine ever waits this long


def load_tiny(folder, cache_dir):
    import torch

    loaded = load_base_model(str(folder), device="cpu", cache_dir=cache_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in loaded.model.model.layers.parameters():
            if parameter.dim() == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return loaded


@pytest.fixture
def loaded(tiny_model_dir, tmp_path):
    return load_tiny(tiny_model_dir, tmp_path / "cache")


def make_engine(loaded, **overrides) -> AnswerEngine:
    options = dict(system_prompt="Be brief.", max_input_tokens=256, max_new_tokens=16, batch_size=8)
    options.update(overrides)
    return AnswerEngine(loaded, **options)


@pytest.fixture
def engine(loaded):
    with make_engine(loaded) as running:
        yield running


class Gate:
    """An `on_partial` that holds the worker at the first token until released."""

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, text: str) -> None:
        self.entered.set()
        self.release.wait(WAIT)


def texts(engine, questions=QUESTIONS) -> list[str]:
    return [engine.answer(q, timeout=WAIT).text for q in questions]


# batching and streaming


def test_the_perturbed_tiny_model_gives_distinct_answers(engine):
    answers = texts(engine)
    assert all(answers)
    assert len(set(answers)) > len(answers) // 2


def test_eight_questions_at_once_share_one_batch_and_equal_single_answers(loaded):
    # nine rows: the blocker keeps decoding while the eight join it (continuous batching)
    with make_engine(loaded, batch_size=9) as engine:
        singles = texts(engine)
        before = engine.stats()["batches"]
        gate = Gate()  # keep the worker busy so that all eight are waiting when it looks
        blocker = engine.submit("hold the worker", on_partial=gate)
        assert gate.entered.wait(WAIT)
        barrier = threading.Barrier(len(QUESTIONS))
        futures: list[Future | None] = [None] * len(QUESTIONS)

        def ask(index: int) -> None:
            barrier.wait()
            futures[index] = engine.submit(QUESTIONS[index])

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(QUESTIONS))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert engine.stats()["queue_depth"] == len(QUESTIONS)
        gate.release.set()
        blocker.result(timeout=WAIT)
        batched = [future.result(timeout=WAIT) for future in futures]
        stats = engine.stats()
    assert [result.text for result in batched] == singles
    assert stats["batches"] - before == 2  # the blocker, then all eight admitted together
    assert stats["answered"] == 2 * len(QUESTIONS) + 1


def test_questions_queued_before_start_go_in_one_batch_with_their_own_limits(loaded):
    engine = make_engine(loaded, batch_size=8)
    with make_engine(loaded) as reference:
        expected = [
            reference.answer(AnswerRequest(q, max_new_tokens=2 + i), timeout=WAIT)
            for i, q in enumerate(QUESTIONS)
        ]
    futures = [
        engine.submit(AnswerRequest(q, max_new_tokens=2 + i)) for i, q in enumerate(QUESTIONS)
    ]
    assert engine.stats()["queue_depth"] == len(QUESTIONS)
    with engine:
        results = [future.result(timeout=WAIT) for future in futures]
        assert engine.stats()["batches"] == 1
        assert engine.stats()["last_batch_size"] == len(QUESTIONS)
    for i, (result, single) in enumerate(zip(results, expected, strict=True)):
        assert result.text == single.text
        assert result.timings.new_tokens == single.timings.new_tokens
        assert 0 < result.timings.new_tokens <= 2 + i
        assert result.timings.total_s >= result.timings.queued_s


def test_on_partial_sees_growing_prefixes_ending_with_the_final_text(engine):
    seen: list[str] = []
    future = engine.submit(
        AnswerRequest("What is the capital of France?", max_new_tokens=24), on_partial=seen.append
    )
    result = future.result(timeout=WAIT)
    assert len(seen) >= 2
    assert seen[-1] == result.text
    for shorter, longer in zip(seen, seen[1:], strict=False):
        assert longer.startswith(shorter) and longer != shorter


def test_a_failing_callback_is_logged_and_never_breaks_the_batch(loaded, caplog):
    def explode(text: str) -> None:
        raise RuntimeError("listener bug")

    engine = make_engine(loaded)
    with make_engine(loaded) as reference:
        expected = texts(reference, QUESTIONS[:3])
    seen: list[str] = []
    futures = [
        engine.submit(QUESTIONS[0], on_partial=explode),
        engine.submit(QUESTIONS[1], on_partial=seen.append),
        engine.submit(QUESTIONS[2]),
    ]
    with engine:
        results = [future.result(timeout=WAIT).text for future in futures]
    assert results == expected
    assert seen[-1] == expected[1]
    assert "on_partial callback failed" in caplog.text


def test_an_empty_question_is_refused_at_once(engine):
    with pytest.raises(EngineError, match="the question is empty"):
        engine.submit("   ")
    with pytest.raises(EngineError, match="the question is empty"):
        engine.answer(AnswerRequest(question=""))


def test_answer_refuses_to_wait_on_an_engine_never_started(loaded):
    with pytest.raises(EngineError, match="not started"):
        make_engine(loaded).answer("hello", timeout=None)


def test_from_settings_loads_the_configured_model(make_settings):
    settings = make_settings(max_new_tokens=3, batch_size=2)
    with AnswerEngine.from_settings(settings) as engine:
        result = engine.answer("hello", timeout=WAIT)
        assert engine.batch_size == 2
    assert result.timings.new_tokens <= 3
    assert result.adapter_version is None


def _mapping_of(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping holding `address`."""
    fields, inside = {}, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:  # a mapping's first line: its address range
            start, end = (int(bound, 16) for bound in head.split("-"))
            inside = start <= address < end
        elif inside:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc")
def test_a_cpu_model_holds_its_weights_in_huge_page_memory_of_its_own(tiny_model_dir, tmp_path):
    """Not in the safetensors file's copy-on-write map, where the first adapter merge would
    fault in every page while rows decode (1.2 s for SmolLM2-135M): each weight copied once
    (tied ones stay one), its values the file's, in one region the kernel may back with 2 MiB
    pages where its transparent huge page setting allows them."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    wide = tmp_path / "wide"  # the tiny model's tokenizer, weights of 21 MB
    shutil.copytree(tiny_model_dir, wide)
    config = AutoConfig.from_pretrained(wide)
    config.hidden_size, config.intermediate_size = 512, 1024
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(wide)
    loaded = load_base_model(str(wide), device="cpu", cache_dir=tmp_path / "cache")
    model, files = loaded.model, {str(path.resolve()) for path in wide.glob("*.safetensors")}
    mapped = {
        line.split(maxsplit=5)[5]
        for line in Path("/proc/self/maps").read_text().splitlines()
        if len(line.split(maxsplit=5)) == 6
    }
    assert files and not files & mapped
    saved = load_file(wide / "model.safetensors")
    named = dict(model.named_parameters())
    assert named and all(torch.equal(named[name], saved[name]) for name in named)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    setting = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if setting.exists() and "[never]" not in setting.read_text():
        region = _mapping_of(model.model.embed_tokens.weight.data_ptr())
        assert region.get("THPeligible") == "1"


def test_weights_already_in_memory_of_their_own_are_not_copied():
    import torch

    from bot.engine.loading import own_weights

    model = torch.nn.Linear(1024, 2048)  # built here: no file behind it
    addresses = [parameter.data_ptr() for parameter in model.parameters()]
    own_weights(model)
    assert [parameter.data_ptr() for parameter in model.parameters()] == addresses


# timeouts and stopping


def test_a_timeout_raises_quickly_and_the_abandoned_question_is_skipped(engine):
    gate = Gate()
    blocker = engine.submit("hold the worker", on_partial=gate)
    assert gate.entered.wait(WAIT)
    with pytest.raises(EngineTimeout, match=r"no answer within 0.1 s; the engine is busy"):
        engine.answer("nobody waits for this", timeout=0.1)
    gate.release.set()
    blocker.result(timeout=WAIT)
    engine.answer("after the timeout", timeout=WAIT)
    assert engine.stats()["answered"] == 2  # the abandoned question never ran


def test_stop_fails_queued_questions_and_lets_the_one_in_flight_finish(loaded):
    engine = make_engine(loaded).start()
    gate = Gate()
    in_flight = engine.submit("in flight", on_partial=gate)
    assert gate.entered.wait(WAIT)
    queued = [engine.submit(q) for q in QUESTIONS[:3]]
    swap = engine.set_adapter(None, None)
    releaser = threading.Timer(0.2, gate.release.set)
    releaser.start()
    engine.stop(timeout=WAIT)
    releaser.join()
    assert in_flight.result(timeout=0).text
    for future in [*queued, swap]:
        with pytest.raises(EngineStopped, match="ask again"):
            future.result(timeout=0)
    with pytest.raises(EngineStopped):
        engine.submit("too late")
    with pytest.raises(EngineStopped):
        engine.set_adapter(None, None)
    assert not engine.stats()["running"]


def test_stop_aborts_a_batch_that_outlives_the_timeout(loaded, monkeypatch, caplog):
    monkeypatch.setattr(worker_module, "ABORT_GRACE_S", 0.05)
    engine = make_engine(loaded, max_new_tokens=64).start()
    gate = Gate()
    in_flight = engine.submit("in flight", on_partial=gate)
    assert gate.entered.wait(WAIT)
    engine.stop(timeout=0.05)  # the worker is still held: stop gives up and asks for an abort
    assert "did not stop" in caplog.text
    gate.release.set()
    with pytest.raises(EngineStopped):
        in_flight.result(timeout=WAIT)


# adapters


def make_adapter(base_folder, cache_dir, folder, *, seed: int):
    """A LoRA adapter made with peft directly: the fixed config, lora_B drawn from `seed`."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = load_tiny(base_folder, cache_dir).model
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture
def adapters(tiny_model_dir, tmp_path):
    cache = tmp_path / "cache"
    return {
        "v0001": make_adapter(tiny_model_dir, cache, tmp_path / "adapters" / "v0001", seed=11),
        "v0002": make_adapter(tiny_model_dir, cache, tmp_path / "adapters" / "v0002", seed=22),
    }


def test_swapping_adapters_changes_answers_and_none_restores_the_base(engine, adapters):
    base = texts(engine)
    assert engine.active_version is None

    assert engine.set_adapter("v0001", adapters["v0001"]).result(timeout=WAIT) >= 0
    assert engine.active_version == "v0001"
    first = [engine.answer(q, timeout=WAIT) for q in QUESTIONS]
    assert {result.adapter_version for result in first} == {"v0001"}
    assert [result.text for result in first] != base

    engine.set_adapter("v0002", adapters["v0002"]).result(timeout=WAIT)
    second = texts(engine)
    assert second != base and second != [result.text for result in first]

    engine.set_adapter(None, None).result(timeout=WAIT)
    assert engine.active_version is None
    assert texts(engine) == base

    engine.set_adapter("v0001", adapters["v0001"]).result(timeout=WAIT)
    assert texts(engine) == [result.text for result in first]
    assert engine.stats()["swaps"] == 4


@pytest.mark.parametrize("mix_versions", [True, False], ids=["mixed", "drained"])
def test_an_answer_in_flight_finishes_on_the_version_it_started_with(
    loaded, adapters, tiny_model_dir, tmp_path, mix_versions
):
    """Mixed: the swap applies at the next step, the answer in flight keeps the base model's
    weights through the per-row correction and the question asked after the swap decodes beside
    it on v0001. Drained: the swap waits until the answer in flight has finished."""
    request = AnswerRequest("What is the capital of France?", max_new_tokens=48)
    with make_engine(load_tiny(tiny_model_dir, tmp_path / "cache2")) as reference:
        unswapped = reference.answer(request, timeout=WAIT)
        reference.set_adapter("v0001", adapters["v0001"]).result(timeout=WAIT)
        with_adapter = reference.answer(request, timeout=WAIT)
    assert with_adapter.text != unswapped.text

    with make_engine(loaded, mix_versions=mix_versions) as engine:
        gate = Gate()
        merged_at_partial = []  # the version merged into the weights at each partial

        def on_partial(text: str) -> None:
            gate(text)
            merged_at_partial.append(engine.active_version)

        in_flight = engine.submit(request, on_partial=on_partial)
        assert gate.entered.wait(WAIT)
        swap = engine.set_adapter("v0001", adapters["v0001"])
        after = engine.submit(request)  # asked after the swap: answered by the new version
        assert not swap.done()
        gate.release.set()
        result = in_flight.result(timeout=WAIT)
        swap.result(timeout=WAIT)
        later = after.result(timeout=WAIT)
        partials = len(merged_at_partial)
    assert result.adapter_version is None
    assert result.text == unswapped.text
    assert later.adapter_version == "v0001" and later.text == with_adapter.text
    assert partials > 2
    if mix_versions:  # the swap did not wait: most of the answer decoded beside v0001
        assert merged_at_partial[0] is None and merged_at_partial[-1] == "v0001"
    else:
        assert set(merged_at_partial) == {None}


def corrupt_copies(adapters, tmp_path) -> dict[str, object]:
    from safetensors.torch import load_file, save_file

    garbage = tmp_path / "broken" / "v0090"
    shutil.copytree(adapters["v0002"], garbage)
    (garbage / "adapter_model.safetensors").write_bytes(b"this is not a safetensors file")

    no_config = tmp_path / "broken" / "v0091"
    shutil.copytree(adapters["v0002"], no_config)
    (no_config / "adapter_config.json").unlink()

    wrong_shape = tmp_path / "broken" / "v0092"
    shutil.copytree(adapters["v0002"], wrong_shape)
    weights = load_file(wrong_shape / "adapter_model.safetensors")
    key = next(k for k in weights if "lora_A" in k)
    weights[key] = weights[key][:, :32].contiguous()  # as if trained for a narrower model
    save_file(weights, wrong_shape / "adapter_model.safetensors")
    return {"v0090": garbage, "v0091": no_config, "v0092": wrong_shape}


def test_a_broken_adapter_is_refused_and_the_active_version_keeps_serving(
    engine, adapters, tmp_path
):
    broken = corrupt_copies(adapters, tmp_path)
    base = texts(engine)
    # with no adapter yet: the base model must come out untouched
    for version, folder in broken.items():
        with pytest.raises(EngineError, match=f"adapter {version} at .* failed to load: .*"):
            engine.set_adapter(version, folder).result(timeout=WAIT)
        assert engine.active_version is None
    assert texts(engine) == base

    engine.set_adapter("v0001", adapters["v0001"]).result(timeout=WAIT)
    first = texts(engine)
    for version, folder in broken.items():
        with pytest.raises(EngineError, match="; the active version stays v0001"):
            engine.set_adapter(version, folder).result(timeout=WAIT)
        assert engine.active_version == "v0001"
    assert texts(engine) == first
    assert all(engine.answer(q, timeout=WAIT).adapter_version == "v0001" for q in QUESTIONS[:2])

    engine.set_adapter("v0002", adapters["v0002"]).result(timeout=WAIT)
    assert engine.active_version == "v0002"


def test_an_adapter_version_needs_its_folder(engine):
    with pytest.raises(EngineError, match="needs the folder"):
        engine.set_adapter("v0003", None)
