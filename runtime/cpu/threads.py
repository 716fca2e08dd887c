"""Threads and buffers of the CPU executor.

The bookkeeping (gathers, merges, scatters) runs on one thread.  With several
threads and enough big calls, the fused calls (big segments cut into a few row
chunks per thread) run on a small pool of single-threaded workers, so the load
balances dynamically; a kernel's own static split waits for its slowest thread,
which on a shared machine is often descheduled.  Small calls run on one thread;
results are consumed in order (deterministic sums).  Gathered keys land in
per-thread scratch buffers reused across calls.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from .plan import Segment

# Gathered keys (or per-segment key gradients) of one call stay under this many elements.
CHUNK_ELEMENTS = 1 << 23
# Multiply-adds below which a fused call runs on one thread.
PARALLEL_WORK = 1 << 24
# Big segments are cut into about this many pieces per thread (dynamic load balance).
PIECES_PER_THREAD = 4
# Calls submitted ahead of the one whose result is consumed, per thread (bounds memory).
IN_FLIGHT_PER_THREAD = 3


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """Run with n intra-op threads.  The executor's bookkeeping (copies, merges,
    scatters) runs on one thread; only the fused kernels use them all: on a
    busy machine every extra parallel region can stall on a descheduled thread."""
    before = torch.get_num_threads()
    if before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def chunks(seg: Segment, width: int, threads: int = 1):
    """Row ranges of a segment: gathered keys (and key gradients), `width` elements
    per key token, stay under CHUNK_ELEMENTS, and big segments give each thread a
    few pieces to balance."""
    step = max(1, CHUNK_ELEMENTS // max(1, seg.nk * width))
    if threads > 1 and seg.m * seg.block_q * seg.nk * width >= PARALLEL_WORK:
        step = min(step, max(1, math.ceil(seg.m / (PIECES_PER_THREAD * threads))))
    for a in range(0, seg.m, step):
        yield a, min(seg.m, a + step)


def work(seg: Segment, qg: torch.Tensor) -> int:
    return qg.shape[0] * seg.m * seg.block_q * seg.nk * qg.shape[-1]


def run_calls(call, tasks: list, threads: int, qg: torch.Tensor):
    """Yield (task, call(task)) in order.  With several threads and enough big
    tasks, the calls run on a pool of single-threaded workers, which balances the
    load dynamically (a kernel's own static split waits for its slowest thread,
    and on a shared machine one of them is often descheduled); otherwise inline,
    each call with all threads when it is big enough to profit."""
    big = sum(work(seg, qg) >= PARALLEL_WORK for seg, _ in tasks)
    if threads > 1 and big >= 2 * threads:
        pool = _pool(threads)
        pending: deque = deque()
        for task in tasks:  # at most IN_FLIGHT_PER_THREAD * threads results wait, in order
            pending.append((task, pool.submit(_no_grad_call, call, task)))
            if len(pending) >= IN_FLIGHT_PER_THREAD * threads:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
        return
    for task in tasks:
        with intra_op_threads(threads if work(task[0], qg) >= PARALLEL_WORK else 1):
            result = call(task)
        yield task, result


def _no_grad_call(call, task):
    with torch.no_grad():  # grad mode is per thread; these calls never build graphs
        return call(task)


_POOL: dict = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    """Workers that run one kernel call at a time on one intra-op thread each.
    Created (and first used) while the caller runs on one thread, so ATen's lazy
    per-thread setup gives them one thread; the initializer makes that explicit."""
    key = (os.getpid(), threads)
    if key not in _POOL:
        for old in _POOL.values():
            old.shutdown(wait=False)
        _POOL.clear()
        _POOL[key] = ThreadPoolExecutor(
            threads, thread_name_prefix="maskc-cpu", initializer=torch.set_num_threads, initargs=(1,)
        )
    return _POOL[key]


_BUFFERS = threading.local()


def scratch(slot: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A per-thread scratch tensor reused across calls: fresh gathers of tens of
    megabytes cost more in page faults than in copying."""
    pool = _BUFFERS.__dict__.setdefault("pool", {})
    size = math.prod(shape)
    held = pool.get((slot, dtype))
    if held is None or held.numel() < size:
        held = pool[(slot, dtype)] = torch.empty(size, dtype=dtype)
    return held[:size].view(shape)
