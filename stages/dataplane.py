"""A worker's data plane: the inputs it pulls, the outputs it holds, the releases it sends.

  1. `pull` a dispatch's inputs from the producer that holds them (common/transfer): in
     place on one host, one batched Mooncake read otherwise, verified by checksum;
  2. `hold` our outputs in our pool under `<job id>/<stage>`, waiting (and sweeping) while
     the pool is full: the descriptors go in the hand-on;
     `room` says how many more outputs of the largest size seen fit, so that the worker
     claims only work it can hold (admission by capacity): queued jobs wait in the ring;
  3. once our stage has committed, `release_upstream` tells the producer to free our inputs;
     our own holds are freed by our consumer's notice, or `release` when our commit failed;
  4. `chores` (on the heartbeat) records transfer counters and sweeps holds whose notice was
     lost: a hold is needed while its job is live and the next stage has not committed.
"""

from __future__ import annotations

import logging
import time

from ..common.config import Config
from ..common.jobstore import JobStore
from ..common.security import Keys
from ..common.transfer import Exchange, Failure, FailureKind, PoolFull, PullStatus
from ..common.dispatch import Dispatch, TensorDesc
from ..common.wire import TERMINAL_STATES

log = logging.getLogger(__name__)

_FULL_POOL_POLL_S = 0.05


class DataPlane:
    def __init__(self, config: Config, stage: str):
        names = [s.name for s in config.pipeline.stages]
        index = names.index(stage)
        self.stage = stage
        self.prev_stage = names[index - 1] if index else ""
        self.next_stage = names[index + 1] if index + 1 < len(names) else ""
        self.settings = config.transfer
        self.exchange = Exchange(config.transfer, Keys.from_config(config),
                                 config.security.insecure)
        self._next_sweep = time.monotonic() + self.settings.hold_check_s

    @property
    def endpoint(self) -> str:
        return self.exchange.endpoint

    def pull(self, dispatch: Dispatch):
        """(pull, None) with the inputs in place, or (None, why) after cleaning up."""
        started = time.perf_counter()
        pull = self.exchange.pull(dispatch.endpoint, dispatch.tensors)
        status = pull.wait(self.settings.pull_timeout_s)
        if status is PullStatus.DONE:
            self.exchange.count("pull", pull.backend, pull.nbytes, time.perf_counter() - started)
            return pull, None
        failure = pull.failure or Failure(FailureKind.TRANSFER, "pull timed out")
        pull.close()
        log.warning("job %s: pulling inputs failed: %s: %s", dispatch.job_id, failure.kind,
                    failure.message)
        return None, failure

    def hold_key(self, job_id: str) -> str:
        return f"{job_id}/{self.stage}"

    def hold(self, job_id: str, tensors: dict, store: JobStore) -> list[TensorDesc]:
        """Put outputs in the pool; while it is full, sweep old holds and wait a little.
        Raises PoolFull after transfer.put_wait_s."""
        deadline = time.monotonic() + self.settings.put_wait_s
        while True:
            try:
                return self.exchange.put(self.hold_key(job_id), tensors)
            except PoolFull:
                if time.monotonic() >= deadline:
                    raise
                self.sweep(store, 0.0)
                time.sleep(_FULL_POOL_POLL_S)

    def admit(self, cells: list[int], store: JobStore) -> list[int]:
        """The lease cells we may fill now: as many as the pool can hold outputs for
        (sweeping holds no one needs first), so a full pool makes jobs wait, never fail."""
        room = self.room()
        if room is not None and room < len(cells):
            self.sweep(store, 0.0)
            room = self.room()
        return cells if room is None else cells[:room]

    def room(self) -> int | None:
        """How many more outputs fit in the pool, at the largest size one has taken so far;
        None before the first (nothing to go by) or when this stage holds nothing."""
        largest = self.exchange.largest_put_bytes
        if not self.next_stage or not largest:
            return None
        return self.exchange.pool.largest_free() // largest

    def release(self, job_id: str) -> None:
        self.exchange.release(self.hold_key(job_id))

    def release_upstream(self, dispatch: Dispatch) -> None:
        self.exchange.notify_release(dispatch.endpoint, f"{dispatch.job_id}/{self.prev_stage}")

    def sweep(self, store: JobStore, older_than_s: float) -> int:
        """Release holds older than `older_than_s` that no consumer can need any more."""
        released = 0
        for key in self.exchange.held(older_than_s):
            job_id = key.rpartition("/")[0]
            record = store.get(job_id)
            if (record is None or record.get("state") in TERMINAL_STATES
                    or f"{self.next_stage}.done" in record):
                released += self.exchange.release(key)
        return released

    def chores(self, store: JobStore | None) -> None:
        """Run on the heartbeat: record transfer counters, sweep forgotten holds."""
        if store is None:
            return
        self.flush_counts(store)
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + self.settings.hold_check_s
            self.sweep(store, self.settings.hold_check_s)

    def flush_counts(self, store: JobStore) -> None:
        counts = self.exchange.take_counts()
        if counts:
            store.add_transfer(self.stage, counts)

    def close(self, store: JobStore | None) -> None:
        if store is not None:
            try:
                self.flush_counts(store)
            except Exception:
                log.warning("could not record transfer counters", exc_info=True)
        self.exchange.close()
