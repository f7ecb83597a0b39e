"""Finding, retrying and cleaning up jobs in the store (real Redis): state names, progress,
revive, purge, retention and trimming, the per-job history, and the filtered listing."""

from __future__ import annotations

import time

import pytest

from stagepool.common import transitions as tx
from stagepool.common.errors import ProtocolError
from stagepool.common.jobquery import JobFilter, find
from stagepool.common.jobstore import JobStore, job_status

STAGES = ["encode", "denoise", "decode"]


@pytest.fixture
def store(redis_server, namespace):
    s = JobStore(redis_server.url, namespace)
    yield s
    s.close()


def _submit(store, job_id):
    assert store.apply(tx.Submit(job_id, "p", b'{"prompt": "p"}', "encode", b"d-encode")).ok


def _fail_in_denoise(store, job_id):
    _submit(store, job_id)
    store.apply(tx.Start(job_id, "encode", 1, "w", "encoding", 0))
    store.apply(tx.Finish(job_id, "encode", 1, "w", "denoise", b"d-denoise"))
    store.apply(tx.Start(job_id, "denoise", 1, "w", "denoising", 1))
    assert store.apply(tx.Retry(job_id, "denoise", 1, "w", "ValueError: bad", 3,
                                "fatal")).status == "failed"


def _status(store, job_id):
    return job_status(job_id, store.get(job_id), STAGES)


def test_the_state_names_what_is_happening_and_progress_is_full_once_done(store):
    _submit(store, "j")
    assert _status(store, "j").state == "queued:encode"
    store.apply(tx.Start("j", "encode", 1, "w", "encoding", 0))
    assert _status(store, "j").state == "encoding"
    store.apply(tx.Finish("j", "encode", 1, "w", "denoise", b"d"))
    waiting = _status(store, "j")
    assert (waiting.state, waiting.stage, waiting.progress) == ("queued:denoise", "denoise", None)
    store.apply(tx.Start("j", "denoise", 1, "w", "denoising", 1))
    store.apply(tx.Progress("j", "denoise", 1, 3, 4))
    assert _status(store, "j").progress == 0.75
    assert store.apply(tx.Retry("j", "denoise", 1, "w", "oom", 3, "error")).status == "retry"
    assert _status(store, "j").state == "queued:denoise"  # waiting again after a failure
    store.apply(tx.Start("j", "denoise", 2, "w", "denoising", 1))
    store.apply(tx.Finish("j", "denoise", 2, "w", "decode", b"d"))
    store.apply(tx.Start("j", "decode", 1, "w", "decoding", 2))
    store.apply(tx.Complete("j", "decode", 1, "w", b"{}"))
    done = _status(store, "j")
    assert (done.state, done.progress) == ("succeeded", 1.0)
    # Steps live in the record only: the events stream holds transitions, not steps.
    events = [e[1][b"event"] for e in store.redis.xrange(store.keys.events)]
    assert b"progress" not in events and len(events) == 9


def test_a_failed_job_is_revived_at_the_stage_it_failed_in(store):
    _fail_in_denoise(store, "f")
    outcome = store.apply(tx.Revive("f"))
    assert outcome.status == "retry"
    attempt, dispatch, stage = outcome.values
    assert (int(attempt), dispatch, stage) == (2, b"d-denoise", b"denoise")
    record = store.get("f")
    assert record["state"] == "queued:denoise" and "error" not in record
    assert record["denoise.retries"] == "0" and record["encode.attempt"] == "1"
    assert store.redis.zscore(store.keys.active, "f") is not None
    assert store.redis.zrange(store.keys.queued("denoise"), 0, -1) == [b"f"]
    # The new attempt runs; the old one is fenced off.
    assert store.apply(tx.Start("f", "denoise", 1, "w", "denoising", 1)).status == "stale"
    assert store.apply(tx.Start("f", "denoise", 2, "w", "denoising", 1)).ok
    history = [(e["event"], e["stage"], e["attempt"]) for e in store.history("f")]
    assert history[-3:] == [("failed", "denoise", "1"), ("revived", "denoise", "2"),
                            ("started", "denoise", "2")]
    assert store.history("f")[-3]["detail"] == "ValueError: bad"  # each error keeps its text


def test_a_jobs_history_keeps_its_newest_200_entries(store):
    _submit(store, "h")
    for _ in range(110):  # two entries a round: cancelled, revived
        assert store.apply(tx.Cancel("h")).ok
        assert store.apply(tx.Revive("h")).status == "retry"
    history = store.history("h")
    assert len(history) == 200
    assert [e["event"] for e in history[-2:]] == ["cancelled", "revived"]
    assert history[-1]["attempt"] == "111"


def test_a_dead_job_leaves_the_dead_letters_when_revived(store):
    _submit(store, "d")
    store.apply(tx.Retry("d", "encode", 1, "b", "lease expired", 1, "crash"))
    assert store.redis.lrange(store.keys.dead, 0, -1) == [b"d"]
    assert store.apply(tx.Revive("d")).status == "retry"
    assert store.redis.lrange(store.keys.dead, 0, -1) == []


def test_revive_refuses_a_succeeded_a_running_and_a_never_dispatched_job(store):
    _submit(store, "running")
    assert store.apply(tx.Revive("running")).values == (b"queued:encode",)
    store.apply(tx.Reject("bad", "params do not decode"))
    assert store.apply(tx.Revive("bad")).status == "refused"
    assert store.apply(tx.Revive("nobody")).status == "missing"
    assert store.apply(tx.Revive("running")).status == "refused"


def test_ended_records_expire_after_retention_and_their_ids_are_forgotten(redis_server, namespace):
    store = JobStore(redis_server.url, namespace, retention_s=0.3)
    try:
        _fail_in_denoise(store, "old")
        _submit(store, "live")
        assert 0 < store.redis.pttl(store.keys.job("old")) <= 300
        assert store.redis.pttl(store.keys.log("old")) > 0
        assert store.redis.pttl(store.keys.job("live")) == -1  # an unfinished job never expires
        deadline = time.monotonic() + 5
        while store.redis.exists(store.keys.job("old")):
            assert time.monotonic() < deadline, "the ended record never expired"
            time.sleep(0.05)
        assert not store.redis.exists(store.keys.log("old"))
        assert store.apply(tx.Trim("")).values == (1,)
        assert store.redis.zrange(store.keys.jobs, 0, -1) == [b"live"]
        assert store.apply(tx.Trim("")).values == (0,)
    finally:
        store.close()


def test_a_revived_job_stops_expiring(redis_server, namespace):
    store = JobStore(redis_server.url, namespace, retention_s=60)
    try:
        _fail_in_denoise(store, "f")
        assert store.redis.pttl(store.keys.job("f")) > 0
        store.apply(tx.Revive("f"))
        assert store.redis.pttl(store.keys.job("f")) == -1
        assert store.redis.pttl(store.keys.log("f")) == -1
    finally:
        store.close()


def test_purge_deletes_only_ended_jobs_of_its_state_that_ended_before_the_cutoff(store):
    _fail_in_denoise(store, "failed-1")
    _submit(store, "cancelled-1")
    store.apply(tx.Cancel("cancelled-1"))
    _submit(store, "running-1")
    now_ms = store.now_ms() + 1
    outcomes = store.run([tx.Purge(i, "failed", now_ms)
                          for i in ("failed-1", "cancelled-1", "running-1")])
    assert [o.status for o in outcomes] == ["ok", "kept", "kept"]
    assert store.get("failed-1") is None and store.history("failed-1") == []
    assert store.apply(tx.Purge("cancelled-1", "", now_ms - 60_000)).status == "kept"  # too new
    assert store.apply(tx.Purge("cancelled-1", "", now_ms)).ok
    assert store.apply(tx.Purge("running-1", "", now_ms)).status == "kept"  # never unfinished
    assert store.redis.zrange(store.keys.jobs, 0, -1) == [b"running-1"]


def test_the_listing_filters_by_state_group_and_stage(store):
    _fail_in_denoise(store, "f1")
    _submit(store, "q1")
    _submit(store, "r1")
    store.apply(tx.Start("r1", "encode", 1, "w", "encoding", 0))

    def ids(**kw):
        return [j.job_id for j in find(store, JobFilter(**kw), STAGES)[0]]

    assert ids(state="failed") == ["f1"]
    assert ids(state="queued") == ["q1"] and ids(state="queued:encode") == ["q1"]
    assert ids(state="running") == ["r1"] and ids(state="encoding") == ["r1"]
    assert ids(state="active") == ["r1", "q1"]
    assert ids(state="ended", stage="denoise") == ["f1"]
    assert ids(stage="encode") == ["r1", "q1"]
    assert ids() == ["r1", "q1", "f1"]
    with pytest.raises(ProtocolError, match="no state 'bogus'.*queued:denoise"):
        JobFilter(state="bogus").check(STAGES, ["encoding", "denoising", "decoding"])
    with pytest.raises(ProtocolError, match="no stage 'denoize'"):
        JobFilter(stage="denoize").check(STAGES, [])


def test_pages_never_skip_jobs_created_in_the_same_millisecond(store):
    store.run([tx.Submit(f"j{i:03}", "p", b"{}", "encode", b"d") for i in range(60)])  # one ms
    seen, before_ms, pages = [], 0, 0
    while True:
        jobs, before_ms = find(store, JobFilter(limit=7, before_ms=before_ms), STAGES)
        seen += [j.job_id for j in jobs]
        pages += 1
        if not before_ms:
            break
    assert sorted(seen) == [f"j{i:03}" for i in range(60)] and len(seen) == 60
