"""`train.threads = "auto"`: pick, and keep picking, the intra-op thread count whose train steps are fastest now.

Why measure instead of counting cores: OpenMP threads wait for each other at the end of every parallel region,
so one thread whose core another process holds stalls them all. On the 2-core machine 2 threads beat 1 by
1.85x with idle cores, and lost to it by 2x (un-niced hog on one core) to 12x (earlier measurement) when one other
process was busy. Only the step time itself says which count is faster on this machine now.

The rule (`ThreadTuner`):

- candidates: 1, the powers of two below the most this rank may use, and that most (`candidates`);
- step 1 runs at the most (it pays one-time costs and is not compared); then each candidate, fewest threads
  first, runs ``probe_steps`` steps (one, when its first is ``cut`` times slower than the best so far) and the
  fastest (its minimum step time) is taken;
- another candidate is re-tried for one step once the run has spent ``1 / budget`` times what trying it costs
  (its last step time minus the chosen one's), so re-checks take at most ~``budget`` of the run; each re-check
  that confirms the choice halves that budget for the candidate (back-off), a change of choice resets it;
- when the chosen count's step time (median of its last 3) drifts above ``drift`` times its reference (another
  process started), every candidate is re-tried at once.

Numerics: the thread count changes no forward result and no gradient but the LayerNorm weights' and biases'
(ATen's CPU layer-norm backward sums its rows in per-thread partial sums): those differ at rounding level
(~4e-15 relative in float64, ~2e-6 in float32 on the quickstart), so a step's loss is bit-identical whatever
the count, and later losses can differ at rounding level once such a gradient has moved the weights
(tests/unit/test_threads.py checks both).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from reformer_dist.training.metrics import Metrics

log = logging.getLogger(__name__)


def candidates(most: int) -> list[int]:
    """The thread counts auto tries: 1, the powers of two below `most`, and `most` itself."""
    out, n = {1, max(1, most)}, 2
    while n < most:
        out.add(n)
        n *= 2
    return sorted(out)


@dataclass
class _Seen:
    time_s: float | None = None  # its latest measured step time
    at: float = 0.0  # run time (sum of step times) when it was last measured
    budget: float = 0.0  # the share of run time its re-checks may cost


@dataclass
class ThreadTuner:
    """Chooses the thread count of each train step from measured step times (see the module docstring).

    Call `next_count()` before a step (it applies the count through `set_threads`) and `record(seconds)` after
    it. `choices` holds (step, count, why) for every change of choice, the first one included.
    """

    counts: list[int]
    probe_steps: int = 2
    budget: float = 0.02
    drift: float = 1.5
    cut: float = 1.5
    set_threads: Callable[[int], None] = torch.set_num_threads
    choices: list[tuple[int, int, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.counts or min(self.counts) < 1:
            raise ValueError(f"ThreadTuner: expected thread counts >= 1, got {self.counts}")
        self.counts = sorted(set(self.counts))
        self.chosen = self.counts[-1]
        self._seen = {c: _Seen(budget=self.budget) for c in self.counts}
        self._queue: list[int] = []  # counts still to try in the current round, in order
        self._trials: dict[int, list[float]] = {}
        self._probe_len = self.probe_steps
        self._reason = "start"
        self._reference: float | None = None  # the chosen count's step time when it was chosen
        self._recent: list[float] = []  # the chosen count's last step times (drift)
        self._run_s = 0.0
        self._steps = 0
        self._current: int | None = None

    @property
    def tuning(self) -> bool:
        """Whether there is a choice to make (more than one candidate)."""
        return len(self.counts) > 1

    def next_count(self) -> int:
        """The count the next step runs with (applied with `set_threads`)."""
        if self.tuning and self._steps >= 1 and not self._queue:
            if self._reference is None:
                self._start_round(self.counts, self.probe_steps, "start")
            else:
                due = [c for c in self.counts if c != self.chosen and self._due(c)]
                if due:
                    self._start_round(due, 1, "re-check")
        count = self._queue[0] if self._queue else self.chosen
        if count != self._current:
            self.set_threads(count)
            self._current = count
        return count

    def record(self, seconds: float) -> None:
        """The step just run with the count `next_count` returned took `seconds`."""
        self._steps += 1
        self._run_s += seconds
        if self._steps == 1 or not self.tuning:
            return  # the first step pays one-time costs: not compared
        count = self._current
        assert count is not None  # set by next_count() before every step
        seen = self._seen[count]
        if self._queue:
            trials = self._trials.setdefault(count, [])
            trials.append(seconds)
            best_so_far = min((min(t) for c, t in self._trials.items() if c != count), default=None)
            clearly_slower = best_so_far is not None and seconds > self.cut * best_so_far
            if len(trials) >= self._probe_len or clearly_slower:
                seen.time_s, seen.at = min(trials), self._run_s
                self._queue.pop(0)
                if not self._queue:
                    self._decide()
            return
        self._recent = (self._recent + [seconds])[-3:]
        seen.time_s, seen.at = sorted(self._recent)[len(self._recent) // 2], self._run_s
        if self._reference is not None and len(self._recent) == 3 and seen.time_s > self.drift * self._reference:
            self._start_round(self.counts, self.probe_steps, "drift")  # the machine changed: re-try all

    @property
    def times(self) -> dict[int, float | None]:
        """Each candidate's latest measured step time (seconds), None before it was tried."""
        return {c: s.time_s for c, s in self._seen.items()}

    # ------------------------------------------------------------------ internals
    def _start_round(self, counts: list[int], steps: int, reason: str) -> None:
        self._queue, self._trials, self._probe_len, self._reason = list(counts), {}, steps, reason

    def _due(self, count: int) -> bool:
        """Whether re-trying `count` now keeps re-checks within its share of the run time."""
        s, best = self._seen[count], self._seen[self.chosen]
        if s.time_s is None or best.time_s is None:
            return True
        cost = max(s.time_s - best.time_s, 0.05 * best.time_s)
        return self._run_s - s.at >= cost / s.budget

    def _decide(self) -> None:
        timed = {c: s.time_s for c, s in self._seen.items() if s.time_s is not None}
        best = min(timed, key=lambda c: (timed[c], c))
        if best != self.chosen or not self.choices or self._reason == "drift":
            self.choices.append((self._steps, best, self._reason))
            for s in self._seen.values():
                s.budget = self.budget
        else:  # the choice held: re-check the counts just tried less often
            for c in self._trials:
                self._seen[c].budget = max(self._seen[c].budget / 2, self.budget / 64)
        self.chosen = best
        self._reference = timed[best]
        self._recent = []


def timed_step(tuner: ThreadTuner | None, step: Callable[[], dict[str, Any]], metrics: Metrics) -> dict[str, Any]:
    """Run one train step (`step()` returns its record, with `step_time_s`) at the count `tuner` picks (None:
    the fixed count); adds `threads` to the record, and writes a `threads` event when the choice changes."""
    if tuner is None:
        return {**step(), "threads": torch.get_num_threads()}
    count = tuner.next_count()
    known = len(tuner.choices)
    rec = step()
    tuner.record(rec["step_time_s"])
    if len(tuner.choices) > known:
        at, chosen, why = tuner.choices[-1]
        times = {str(c): None if t is None else round(t, 4) for c, t in tuner.times.items()}
        metrics.event("threads", step=at, threads=chosen, reason=why, step_time_s=times)
        shown = ", ".join(f"{c}: {t:.3g} s" for c, t in times.items() if t is not None)
        log.info(
            f"step {at}: {chosen} intra-op thread{'s' if chosen > 1 else ''} from now on ({why}; step time "
            f"by threads {shown})"
        )
    return {**rec, "threads": count}
