"""Where a pipeline's main thread spends its time: shared by the benchmarks.

    timer = StageTimer("waiting for loads", "launching")
    module.fn = timer.timed("launching", module.fn)   # patch, run, restore
    spent = timer.run(lambda: pipeline(), sync)       # adds "the rest"
    count_ops(lambda: extractor.extract(batch))       # tensor operations one call dispatches
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


# Operations that only make a view or reshape metadata: no kernel on any device.
_VIEWS = {"view", "_unsafe_view", "transpose", "permute", "slice", "select", "reshape", "expand", "split",
          "split_with_sizes", "unbind", "detach", "alias", "t", "unsqueeze", "squeeze", "as_strided"}


def count_ops(fn: Callable[[], object]) -> int:
    """Tensor operations ``fn()`` dispatches that are not views: about the kernels it launches
    on a GPU, each costing the launching thread several microseconds. Counted on any
    device (a CPU run shows what a CUDA one will launch, less host-side copies)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            # `x.to(x.dtype)` and the like hand back their input: no kernel either (in-place
            # operations, named with a trailing _, also do, and launch one).
            name = func.overloadpacket.__name__
            if name not in _VIEWS and (name.endswith("_") or not (args and out is args[0])):
                self.ops += 1
            return out

    with Count() as counter:
        fn()
    return counter.ops
