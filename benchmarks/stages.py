"""Where a pipeline's main thread spends its time: shared by the benchmarks.

    timer = StageTimer("waiting for loads", "launching")
    module.fn = timer.timed("launching", module.fn)   # patch, run, restore
    spent = timer.run(lambda: pipeline(), sync)       # adds "the rest"
"""

from __future__ import annotations

import threading
import time
from typing import Callable


class StageTimer:
    """Seconds the main thread spends inside the functions wrapped by :meth:`timed`, per stage
    (calls from other threads are not counted)."""

    def __init__(self, *stages: str):
        self.spent = dict.fromkeys(stages, 0.0)
        self._main = threading.main_thread()

    def timed(self, stage: str, f: Callable) -> Callable:
        def call(*args, **kwargs):
            if threading.current_thread() is not self._main:
                return f(*args, **kwargs)
            start = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                self.spent[stage] += time.perf_counter() - start
        return call

    def run(self, fn: Callable[[], object], sync: Callable[[], None]) -> dict[str, float]:
        """One timed ``fn()`` (``sync`` waits for the device around it); the stages plus
        ``the rest``."""
        sync()
        start = time.perf_counter()
        fn()
        sync()
        whole = time.perf_counter() - start
        return {**self.spent, "the rest": whole - sum(self.spent.values())}
