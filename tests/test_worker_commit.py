"""The worker's commit-and-hand-on logic (unit tests of logic: a scripted store and ring).

A lone job of a cheap stage is handed on before its commit lands, naming the next stage's
first attempt and carrying the commit. These tests pin what is published in each case the
commit's answer can take. The transitions' semantics in Redis are tested in test_jobstore.py,
the whole under faults in test_e2e.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from stagepool.common import config as config_mod
from stagepool.common import wire
from stagepool.common.jobstore import Outcome
from stagepool.stages import base
from stagepool.stages.commits import Ran
from stagepool.stages.worker import Worker


class ScriptedStore:
    def __init__(self, outcomes, retry=None):
        self.outcomes = list(outcomes)  # one list of Outcomes per run_batch call
        self.batches: list[list[tuple]] = []
        self.retry_outcome = retry
        self.retries = []

    def run_batch(self, transitions):
        self.batches.append(transitions)
        return self.outcomes.pop(0)

    def retry(self, *args, **kwargs):
        self.retries.append((args, kwargs))
        return self.retry_outcome


class RecordingRing:
    layout = SimpleNamespace(payload_max=1008)

    def __init__(self):
        self.published: list[wire.Dispatch] = []

    def produce(self, payload, timeout_s):
        self.published.append(wire.decode_dispatch(payload))


@pytest.fixture
def worker():
    config = config_mod.load("configs/noop.toml", env={})
    w = Worker(config, "encode", worker_id="w1")
    w._registered = wire.Registered(broker_id="b", cell=0, cells=[0, 1],
                                    consume=wire.RingAttach(stage="encode"),
                                    next_stage="denoise", max_attempts=3)
    w._produce = RecordingRing()
    w._consume = SimpleNamespace(depth=lambda: 0)  # nothing else waiting: low load
    return w


def _ran(job_id="j1", params=b'{"p": 1}', submit=""):
    dispatch = wire.Dispatch(job_id, 1, "encode", params=params, submit=submit)
    return Ran(dispatch, params, base.StageOutput(result={}), None, 0, ahead=True)


def test_a_lone_job_is_handed_on_first_carrying_its_submit_and_commit(worker):
    worker._store = ScriptedStore([[Outcome("ok", ("queued",)), Outcome("ok", (b"1",))]])
    worker._commit([_ran(submit="tok")])
    [early] = worker._produce.published
    assert early.attempt == 1 and early.stage == "denoise" and early.params == b'{"p": 1}'
    commands = [t[0] for t in early.carried]
    assert commands == [b"submit", b"pass"] and early.carried[0][-1] == b"tok"
    # The commit sent to Redis is the same pair, after the publish.
    [batch] = worker._store.batches
    assert [t[0] for t in batch] == ["submit", "pass"]
    assert worker.jobs_done == 1


def test_an_early_hand_on_naming_the_wrong_attempt_is_corrected(worker):
    worker._store = ScriptedStore([[Outcome("ok", (b"3",))]])
    worker._commit([_ran()])
    early, corrected = worker._produce.published
    assert early.attempt == 1 and early.carried
    assert corrected.attempt == 3 and corrected.carried == [] and corrected.job_id == "j1"


def test_a_commit_the_next_stage_applied_first_is_recovered_from_redis(worker):
    stored = wire.encode_dispatch(wire.Dispatch("j1", 1, "denoise", params=b"{}"))
    worker._store = ScriptedStore([[Outcome("duplicate")]],
                                  retry=Outcome("republish", (b"denoise", b"2", stored)))
    worker._commit([_ran()])
    early, recovered = worker._produce.published
    assert recovered.attempt == 2 and recovered.stage == "denoise"
    (args, kwargs), = worker._store.retries
    assert kwargs == {"crash": True, "next_stage": "denoise"}


def test_a_refused_commit_publishes_nothing_more(worker):
    worker._store = ScriptedStore([[Outcome("terminal", (b"cancelled",))]])
    worker._commit([_ran()])
    assert len(worker._produce.published) == 1  # the early one, refused downstream too
    assert worker.jobs_done == 0


def test_a_batch_commits_first_then_hands_on(worker):
    worker._store = ScriptedStore([[Outcome("ok", (b"1",)), Outcome("ok", (b"1",))]])
    worker._commit([_ran("a"), _ran("b")])
    assert [(d.job_id, d.attempt, d.carried) for d in worker._produce.published] == [
        ("a", 1, []), ("b", 1, [])]


def test_a_lone_job_with_more_waiting_commits_first(worker):
    worker._consume = SimpleNamespace(depth=lambda: 3)
    worker._store = ScriptedStore([[Outcome("ok", (b"1",))]])
    worker._commit([_ran()])
    [published] = worker._produce.published
    assert published.carried == [] and published.attempt == 1


def test_a_record_too_big_to_carry_its_commit_waits_for_it(worker):
    params = b'{"p": "' + b"x" * 600 + b'"}'
    worker._store = ScriptedStore([[Outcome("ok", (b"1",))]])
    worker._commit([_ran(params=params)])
    [published] = worker._produce.published
    assert published.carried == [] and published.params == params
