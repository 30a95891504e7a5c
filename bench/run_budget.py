"""Time budget of a serving benchmark run (bench/serve.py --budget-s, --mode-reserve-s).

A point starts only while the budget lasts. With a per-mode reserve (what a mode needs before its first point:
worker start, prefetch, warm-up), a mode's worker starts only while its reserve is left, and a mode's second and later
points give way unless, after a point as long as the one before, the reserve of every mode still to start would
remain: a slow baseline's later loads cannot eat the time the modes after it need for their first point.
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
    last_point_s: float = 0.0  # how long the last point took: the estimate for the next point of its mode

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started_at

    def remaining_s(self) -> float:
        return self.total_s - self.elapsed_s() if self.total_s else math.inf

    def why_skip_mode(self) -> str | None:
        """None when a mode's worker may start now, else why the mode is skipped."""
        left_s = self.remaining_s()
        if left_s <= 0:
            return f"budget of {self.total_s:.0f} s spent before its worker started"
        if left_s < self.reserve_s_per_mode:
            return (f"{left_s:.0f} s left when its worker would start, "
                    f"less than the {self.reserve_s_per_mode:.0f} s reserve")
        return None

    def why_skip(self, first_of_mode: bool) -> str | None:
        """None when a point may start now, else why it is skipped."""
        left_s = self.remaining_s()
        if left_s <= 0:
            return f"budget of {self.total_s:.0f} s spent"
        reserve_s = self.reserve_s_per_mode * self.modes_after
        if not first_of_mode and left_s - self.last_point_s < reserve_s:
            return (f"{left_s:.0f} s left, a point takes ~{self.last_point_s:.0f} s and {reserve_s:.0f} s are kept "
                    f"for the {self.modes_after} mode run(s) still to start")
        return None
