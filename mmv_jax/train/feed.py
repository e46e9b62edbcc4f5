"""Batches on the devices ahead of use: the train loop's feed.

``DeviceFeed(iterator, sharding, depth)`` keeps ``depth`` batches already handed to the devices
(``jax.make_array_from_process_local_data`` starts the host-to-device copy and returns), so the
copy of batch ``N + depth`` overlaps the step running on batch ``N``. The loop takes a batch,
dispatches its step (asynchronous), and only then refills: the time it blocks on the data
pipeline overlaps the step the devices are running.

Everything happens on the calling thread, in step order, on every process: the iterator's
cross-process bucket agreement (a host-side key-value exchange) stays in the same order
everywhere. Each batch carries the iterator state right after it was drawn, so a checkpoint of
step ``N`` stores the data position of step ``N``, not of the prefetched batches.
"""

from __future__ import annotations

import collections
import time

import jax
import numpy as np

from mmv_jax.errors import ConfigError


class DeviceFeed:
    def __init__(self, iterator, sharding, *, depth: int = 2, limit: int | None = None):
        """``limit``: how many batches to draw at most (the steps left), so a finished run does
        not read past its end."""
        if depth < 1:
            raise ConfigError(f"config.prefetch_to_device={depth} must be >= 1")
        self._it, self._sharding, self._depth = iterator, sharding, int(depth)
        self._left = limit
        self._queue: collections.deque = collections.deque()
        self.wait_s = 0.0  # time spent blocked on the host pipeline, since the last reset

    @property
    def depth(self) -> int:
        return self._depth

    def fill(self) -> None:
        """Draws host batches until ``depth`` are on their way to the devices."""
        while len(self._queue) < self._depth and self._left != 0:
            t = time.perf_counter()
            host, stats = next(self._it)
            self.wait_s += time.perf_counter() - t
            state = self._it.get_state()
            device = jax.tree.map(
                lambda x: jax.make_array_from_process_local_data(self._sharding, np.asarray(x)),
                host,
            )
            self._queue.append((device, host, stats, state))
            if self._left is not None:
                self._left -= 1

    def get(self):
        """``(device_batch, host_batch, stats, iterator_state_after_it)`` of the next step."""
        self.fill()
        return self._queue.popleft()

    def take_wait(self) -> float:
        w, self.wait_s = self.wait_s, 0.0
        return w
