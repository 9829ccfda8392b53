"""How many CPU threads a decoding step gets: measured, not guessed.

A decoding step is some 700 small operators. With torch's intra-op threads each operator ends
in a barrier where every thread waits for the slowest. On an idle machine two threads beat one;
on a machine whose cores are busy with something else (a learning cycle's training process,
another job) a thread that the kernel has descheduled holds every barrier for a time slice,
and the same step gets several times slower than on one thread (measured on 2 shared cores:
37 ms a step on one thread, 190-250 ms on two; at batch 8, 70 ms against 0.9-4 s; see
bench/profile_decode.py).

So the worker asks a `ThreadTuner` before each step. It keeps serving with its current choice
and, now and then, runs one step with the other choice at the same batch width: if that step
is clearly faster (by `margin`) the choice switches; if not, the next probe waits twice as long
(up to `longest_wait` steps), so a bad alternative costs little. Thread counts change float
rounding in the last bits only (the logits of the real model moved by < 1e-4; greedy answers
equal in the tests), as batching does.
"""

from __future__ import annotations


class ThreadTuner:
    """Chooses between all threads and one thread per step, from the steps' measured times."""

    def __init__(
        self,
        *,
        most: int,
        first_wait: int = 16,
        longest_wait: int = 1024,
        margin: float = 0.85,
        smoothing: float = 0.3,
    ):
        self.candidates = (most, 1) if most > 1 else (1,)
        self.choice = self.candidates[0]
        self.first_wait = first_wait
        self.longest_wait = longest_wait
        self.margin = margin
        self.smoothing = smoothing
        self.switches = 0
        self.probes = 0
        self._wait = first_wait
        self._countdown = first_wait
        self._seconds: dict[tuple[int, int], float] = {}  # (threads, width) -> s per step

    @property
    def other(self) -> int:
        return self.candidates[1] if self.choice == self.candidates[0] else self.candidates[0]

    def threads_for(self, width: int) -> int:
        """The thread count for the next step of `width` rows (the other one when probing)."""
        if len(self.candidates) > 1 and self._countdown <= 0:
            if (self.choice, width) in self._seconds:
                return self.other
        return self.choice

    def record(self, *, threads: int, width: int, seconds: float) -> None:
        """The step of `width` rows that ran on `threads` threads took `seconds`."""
        key = (threads, width)
        if threads == self.choice:
            known = self._seconds.get(key)
            self._seconds[key] = (
                seconds if known is None else known + self.smoothing * (seconds - known)
            )
            self._countdown -= 1
            return
        self.probes += 1
        reference = self._seconds.get((self.choice, width))
        self._seconds[key] = seconds
        if reference is not None and seconds < self.margin * reference:
            self.choice = threads
            self.switches += 1
            self._wait = self.first_wait
        else:
            self._wait = min(2 * self._wait, self.longest_wait)
        self._countdown = self._wait


def in_passing_thread(function, /, *args, **kwargs):
    """`function(*args, **kwargs)` run in a new thread that ends with it; its result or error.

    For torch work outside the engine's worker on a long-lived thread (the main thread, Bolt's
    listener pool). OpenMP keeps a team of helper threads for every thread that ever ran a
    parallel operator, for as long as that thread lives; once the teams hold more threads than
    there are cores, libgomp stops spinning between parallel regions and every one of a
    decoding step's ~700 operators waits for its helpers to wake up. Measured here: the
    engine's batch-1 decode fell from ~31 to ~15 tokens/s, for good, after one 2-thread tensor
    copy on the main thread, and stayed at ~31 when the same copy ran in a passing thread
    (whose team ends with it). Starting a thread costs ~0.1 ms.
    """
    import threading

    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = function(*args, **kwargs)
        except BaseException as exc:  # handed to the caller
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="torch-passing", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
