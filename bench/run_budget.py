"""Time budget of a serving benchmark run (bench/serve.py --budget-s, --mode-reserve-s).

A point starts only while the budget lasts; with a per-mode reserve, a mode's later points also give way while
the time left would not cover the reserve of every mode still to start, so each mode gets its first point before
any mode gets its second (a slow baseline cannot eat the time of the modes after it).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class RunBudget:
    total_s: float  # 0 = no budget
    reserve_s_per_mode: float = 0.0
    started_at: float = field(default_factory=time.monotonic)
    modes_after: int = 0  # mode runs (bits x mode) still to start after the current one

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started_at

    def remaining_s(self) -> float:
        return self.total_s - self.elapsed_s() if self.total_s else math.inf

    def why_skip(self, first_of_mode: bool) -> str | None:
        """None when a point may start now, else why it is skipped."""
        left_s = self.remaining_s()
        if left_s <= 0:
            return f"budget of {self.total_s:.0f} s spent"
        reserve_s = self.reserve_s_per_mode * self.modes_after
        if not first_of_mode and left_s < reserve_s:
            return f"{left_s:.0f} s left, {reserve_s:.0f} s kept for the {self.modes_after} mode run(s) still to start"
        return None
