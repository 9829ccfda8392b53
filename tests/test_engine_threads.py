"""The thread tuner: it keeps the faster thread count, probes rarely, and never changes answers."""

from __future__ import annotations

import pytest

from bot.engine.threads import ThreadTuner, in_passing_thread
from tests.test_engine_worker import QUESTIONS, WAIT, load_tiny, make_adapter, make_engine


def drive(tuner: ThreadTuner, seconds_per_threads: dict[int, float], *, steps: int, width=4):
    """Run `steps` steps whose time depends only on the thread count; return the counts used."""
    used = []
    for _ in range(steps):
        threads = tuner.threads_for(width)
        used.append(threads)
        tuner.record(threads=threads, width=width, seconds=seconds_per_threads[threads])
    return used


def test_switches_to_one_thread_when_it_is_clearly_faster():
    tuner = ThreadTuner(most=2, first_wait=4)
    used = drive(tuner, {2: 0.25, 1: 0.04}, steps=40)
    assert tuner.choice == 1
    assert used[:4] == [2, 2, 2, 2]  # serves on its first choice until the first probe
    assert used[-10:].count(1) >= 9  # then on one thread, with a rare probe back


def test_keeps_all_threads_when_they_win_and_probes_ever_more_rarely():
    tuner = ThreadTuner(most=2, first_wait=4, longest_wait=64)
    used = drive(tuner, {2: 0.02, 1: 0.04}, steps=400)
    assert tuner.choice == 2
    assert tuner.switches == 0
    # probes after 4, 8, 16, 32 steps, then every 64: 9 in 400 steps, not one in 4
    assert used.count(1) == tuner.probes == 9


def test_a_marginal_gain_does_not_switch():
    tuner = ThreadTuner(most=2, first_wait=2, margin=0.85)
    drive(tuner, {2: 0.10, 1: 0.09}, steps=50)
    assert tuner.choice == 2


def test_probes_compare_steps_of_the_same_width_only():
    tuner = ThreadTuner(most=2, first_wait=2)
    for _ in range(3):
        tuner.record(threads=2, width=8, seconds=0.5)
    assert tuner.threads_for(1) == 2  # no reference at width 1 yet: no probe
    assert tuner.threads_for(8) == 1


def test_one_core_means_nothing_to_tune():
    tuner = ThreadTuner(most=1, first_wait=1)
    assert drive(tuner, {1: 0.1}, steps=10) == [1] * 10


@pytest.fixture
def loaded(tiny_model_dir, tmp_path):
    return load_tiny(tiny_model_dir, tmp_path / "cache")


def test_tuned_engine_gives_the_same_answers(loaded):
    import torch

    before = torch.get_num_threads()
    with make_engine(loaded) as plain:
        expected = [plain.answer(q, timeout=WAIT).text for q in QUESTIONS]
    engine = make_engine(loaded, tune_threads=True)
    with engine:
        together = [engine.submit(q) for q in QUESTIONS]
        got = [f.result(timeout=WAIT).text for f in together]
        alone = [engine.answer(q, timeout=WAIT).text for q in QUESTIONS]
        stats = engine.stats()
        probes = engine._tuner.probes
    # the thread count is process-wide: a stopped engine leaves it as it found it
    assert torch.get_num_threads() == before
    assert got == expected
    assert alone == expected
    assert stats["threads"] in {1, before}
    if before > 1:
        assert probes >= 1  # the other thread count did run steps


@pytest.fixture
def adapters(tiny_model_dir, tmp_path):
    return {"v0001": make_adapter(tiny_model_dir, tmp_path / "c", tmp_path / "v0001", seed=11)}


class AlwaysProbing(ThreadTuner):
    """Runs every step it may on the other thread count (a probe every step)."""

    def threads_for(self, width: int) -> int:
        return self.other


def test_corrected_steps_run_on_the_chosen_threads_not_a_probes(loaded, adapters, monkeypatch):
    """A probe's thread count ends with its step: the steps that correct rows of a version
    other than the merged one (never probed) run on the tuner's choice."""
    import torch

    from bot.engine import threads as threads_module
    from bot.engine.types import AnswerRequest
    from tests.test_engine_worker import Gate

    if torch.get_num_threads() < 2:
        pytest.skip("one torch thread: nothing to choose between")
    monkeypatch.setattr(threads_module, "ThreadTuner", AlwaysProbing)
    most = torch.get_num_threads()
    alone, beside = [], []  # thread counts at the partials of each answer
    with make_engine(loaded, tune_threads=True) as engine:
        gate = Gate()

        def on_partial(text: str) -> None:
            gate(text)
            alone.append(torch.get_num_threads())

        request = AnswerRequest("What is the capital of France?", max_new_tokens=24)
        in_flight = engine.submit(request, on_partial=on_partial)
        assert gate.entered.wait(WAIT)
        engine.set_adapter("v0001", adapters["v0001"])
        # a row on v0001 beside the one on the base (still merged): every step is corrected
        newcomer = engine.submit(
            AnswerRequest("Who are you?", max_new_tokens=4),
            on_partial=lambda text: beside.append(torch.get_num_threads()),
        )
        gate.release.set()
        assert in_flight.result(timeout=WAIT).adapter_version is None
        assert newcomer.result(timeout=WAIT).adapter_version == "v0001"
    assert engine._tuner.choice == most
    assert 1 in alone  # the uncorrected steps did run the probe's single thread
    assert beside and set(beside) == {most}  # never the probe's single thread


def test_in_passing_thread_returns_raises_and_leaves_no_thread_behind():
    import threading

    seen = []

    def work(a, *, b):
        seen.append(threading.current_thread())
        if b is None:
            raise ValueError("no b")
        return a + b

    assert in_passing_thread(work, 2, b=3) == 5
    with pytest.raises(ValueError, match="no b"):
        in_passing_thread(work, 2, b=None)
    assert len(seen) == 2 and threading.current_thread() not in seen
    assert not any(thread.is_alive() for thread in seen)
