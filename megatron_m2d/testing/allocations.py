"""What PyTorch's allocator really allocated, on CPU too: live bytes at named points and peaks between them.

CUDA has `torch.cuda.memory_allocated` / `max_memory_allocated`; the CPU allocator has no such counters, but
PyTorch's profiler records every allocation and free of its CPU allocator (`profile_memory=True`: "[memory]"
events with signed byte counts). Replaying them in time order gives the live bytes at any moment, which is what
the memory plan is checked against and what the benchmark reports as the KD loss's peak on CPU (on a GPU,
read torch.cuda.max_memory_allocated instead).

    with AllocationTrace() as trace:
        trace.mark("start"); loss = step(); trace.mark("forward")
    trace.live("forward") - trace.live("start")        # bytes kept across the forward
    trace.peak("start", "forward") - trace.live("start")  # the forward's peak above the start
"""

from __future__ import annotations

import bisect

import torch
from torch.profiler import ProfilerActivity, profile, record_function


class AllocationTrace:
    def __init__(self):
        self._marks: dict[str, int] = {}  # name -> profiler time (ns)
        self._times: list[int] = []
        self._live: list[int] = []

    def __enter__(self) -> "AllocationTrace":
        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profile.__enter__()
        return self

    def mark(self, name: str) -> None:
        with record_function(f"mark::{name}"):
            pass

    def __exit__(self, *exc) -> None:
        self._profile.__exit__(*exc)
        if exc[0] is not None:
            return
        events = self._profile.profiler.kineto_results.events()
        memory = sorted((e.start_ns(), e.nbytes()) for e in events
                        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
        live = 0
        for when, nbytes in memory:
            live += nbytes
            self._times.append(when)
            self._live.append(live)
        for e in events:
            if e.name().startswith("mark::"):
                self._marks[e.name()[len("mark::"):]] = e.start_ns()

    def live(self, name: str) -> int:
        """Bytes allocated (since the trace started) at mark `name`."""
        i = bisect.bisect_right(self._times, self._marks[name])
        return self._live[i - 1] if i else 0

    def peak(self, start: str, end: str) -> int:
        """Highest live bytes between two marks."""
        lo = bisect.bisect_right(self._times, self._marks[start])
        hi = bisect.bisect_right(self._times, self._marks[end])
        return max(self._live[max(lo - 1, 0):hi], default=self.live(start))
