"""The Redis job store: transitions, fencing, and multi-process commit races (real Redis)."""

from __future__ import annotations

import multiprocessing

import pytest

from stagepool.common import transitions as tx
from stagepool.common.jobstore import JobStore

ctx = multiprocessing.get_context("spawn")


@pytest.fixture
def store(redis_server, namespace):
    s = JobStore(redis_server.url, namespace)
    yield s
    s.close()


def _submit(store, job_id="j1"):
    return store.apply(tx.Submit(job_id, "noop", b'{"prompt": "p"}', "encode", b"dispatch-encode"))


def test_the_same_job_id_submitted_twice_is_one_job(store):
    assert _submit(store).ok
    again = _submit(store)
    assert again.status == "exists"
    assert store.redis.zcard(store.keys.jobs) == 1


def test_a_job_walks_through_every_stage_to_succeeded(store):
    _submit(store)
    assert store.apply(tx.Start("j1", "encode", 1, "w1", "encoding", 0)).values[0] == b'{"prompt": "p"}'
    assert store.get("j1")["state"] == "encoding"
    assert store.apply(tx.Finish("j1", "encode", 1, "w1", "decode", b"dispatch-decode")).ok
    assert store.apply(tx.Start("j1", "decode", 1, "w2", "decoding", 1)).ok
    assert store.apply(tx.Complete("j1", "decode", 1, "w2", b'{"ok": true}')).ok
    record = store.get("j1")
    assert record["state"] == "succeeded" and record["commits"] == "1"
    assert store.redis.zscore(store.keys.results, "j1") is not None
    assert store.redis.zscore(store.keys.active, "j1") is None


def test_a_stale_attempt_cannot_start_or_commit(store):
    _submit(store)
    store.apply(tx.Start("j1", "encode", 1, "w1", "encoding", 0))
    outcome = store.apply(tx.Retry("j1", "encode", 1, "broker", "lease expired", 3, "crash"))
    assert outcome.status == "retry" and outcome.values[0] == b"2"
    assert store.apply(tx.Finish("j1", "encode", 1, "w1", "decode", b"d")).status == "stale"
    assert store.apply(tx.Start("j1", "encode", 2, "w2", "encoding", 0)).ok
    assert store.apply(tx.Start("j1", "encode", 2, "w3", "encoding", 0)).status == "duplicate"


def test_crashes_past_max_attempts_dead_letter_the_job(store):
    _submit(store)
    assert store.apply(tx.Retry("j1", "encode", 1, "b", "boom", 2, "crash")).status == "retry"
    assert store.apply(tx.Retry("j1", "encode", 2, "b", "boom", 2, "crash")).status == "dead"
    assert store.get("j1")["state"] == "dead"
    assert store.redis.lrange(store.keys.dead, 0, -1) == [b"j1"]


def test_errors_past_max_attempts_fail_the_job_with_its_error(store):
    _submit(store)
    store.apply(tx.Retry("j1", "encode", 1, "w", "ValueError: bad", 1, "error"))
    record = store.get("j1")
    assert record["state"] == "failed" and record["error"] == "ValueError: bad"


def test_a_committed_but_undelivered_hand_on_is_republished(store):
    _submit(store)
    store.apply(tx.Start("j1", "encode", 1, "w1", "encoding", 0))
    store.apply(tx.Finish("j1", "encode", 1, "w1", "decode", b"dispatch-decode"))
    # The worker died before publishing into the decode ring; its lease expires.
    outcome = store.apply(tx.Retry("j1", "encode", 1, "broker", "lease expired", 3, "crash",
                          "decode"))
    assert outcome.status == "republish"
    assert outcome.values == (b"decode", b"1", b"dispatch-decode")


def test_a_cancelled_job_refuses_further_stages(store):
    _submit(store)
    assert store.apply(tx.Cancel("j1")).ok
    assert store.apply(tx.Start("j1", "encode", 1, "w", "encoding", 0)).status == "terminal"
    assert store.apply(tx.Cancel("j1")).status == "terminal"


def test_rebuild_fences_off_the_attempt_running_before_a_restart(store):
    _submit(store)
    store.apply(tx.Start("j1", "encode", 1, "w1", "encoding", 0))
    outcome = store.apply(tx.Rebuild("j1", ["encode", "decode"]))
    assert outcome.status == "retry" and outcome.values[0] == b"2"
    assert store.apply(tx.Finish("j1", "encode", 1, "w1", "decode", b"d")).status == "stale"


def _race_complete(store, worker):
    result = b'{"w": %d}' % worker
    return store.apply(tx.Complete("race", "decode", 1, f"w{worker}", result)).status


def _race_start(store, worker):
    return store.apply(tx.Start("race", "encode", 1, f"w{worker}", "encoding", 0)).status


def _contender(url, namespace, action, worker, results):
    results.put(action(JobStore(url, namespace), worker))


def _race(redis_server, namespace, action, contenders=5) -> list[str]:
    """Run `action` in `contenders` processes at once; their statuses."""
    results = ctx.Queue()
    procs = [ctx.Process(target=_contender,
                         args=(redis_server.url, namespace, action, i, results))
             for i in range(contenders)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=30)
    return [results.get(timeout=5) for _ in procs]


@pytest.mark.cluster
def test_five_processes_committing_one_result_exactly_one_wins(store, redis_server, namespace):
    store.apply(tx.Submit("race", "noop", b"{}", "decode", b"d"))
    store.apply(tx.Start("race", "decode", 1, "w0", "decoding", 0))
    statuses = _race(redis_server, namespace, _race_complete)
    assert statuses.count("ok") == 1
    assert statuses.count("duplicate") + statuses.count("terminal") == 4
    assert store.get("race")["commits"] == "1"


@pytest.mark.cluster
def test_five_processes_starting_one_attempt_exactly_one_wins(store, redis_server, namespace):
    store.apply(tx.Submit("race", "noop", b"{}", "encode", b"d"))
    statuses = _race(redis_server, namespace, _race_start)
    assert statuses.count("ok") == 1 and statuses.count("duplicate") == 4


def _queued(store, stages=("encode", "denoise", "decode")):
    return {s: [m.decode() for m in store.redis.zrange(store.keys.queued(s), 0, -1)]
            for s in stages}


def test_the_queued_sets_follow_every_transition_exactly(store):
    """{ns}:queued:<stage> is the depth the metrics report: in on dispatch, out on start/end."""
    _submit(store, "a")
    _submit(store, "b")
    assert _queued(store) == {"encode": ["a", "b"], "denoise": [], "decode": []}
    assert [d for d, _ in store.queue_stats(["encode", "denoise"])] == [2, 0]
    store.apply(tx.Start("a", "encode", 1, "w", "encoding", 0))
    assert _queued(store)["encode"] == ["b"]
    store.apply(tx.Finish("a", "encode", 1, "w", "denoise", b"d"))
    assert _queued(store)["denoise"] == ["a"]
    store.apply(tx.Start("a", "denoise", 1, "w", "denoising", 1))
    # A failed attempt is waiting again; a rewind sends the job back to encode's queue.
    assert store.apply(tx.Retry("a", "denoise", 1, "w", "oom", 3, "error")).status == "retry"
    assert _queued(store)["denoise"] == ["a"]
    store.apply(tx.Start("a", "denoise", 2, "w", "denoising", 1))
    assert store.apply(tx.Rewind("a", "denoise", 2, "w", "producer gone", "encode", 0,
                        3)).status == "retry"
    assert _queued(store) == {"encode": ["b", "a"], "denoise": [], "decode": []}  # oldest first
    # A rebuild (broker restart) keeps a waiting job's age; cancel and completion remove it.
    enqueued = store.redis.zscore(store.keys.queued("encode"), "b")
    assert store.apply(tx.Rebuild("b", ["encode", "denoise", "decode"])).status == "retry"
    assert store.redis.zscore(store.keys.queued("encode"), "b") == enqueued
    store.apply(tx.Cancel("b"))
    assert _queued(store)["encode"] == ["a"]
    store.apply(tx.Start("a", "encode", 2, "w", "encoding", 0))
    store.apply(tx.Finish("a", "encode", 2, "w", "decode", b"d"))
    store.apply(tx.Start("a", "decode", 1, "w", "decoding", 2))
    store.apply(tx.Complete("a", "decode", 1, "w", b"{}"))
    assert _queued(store) == {"encode": [], "denoise": [], "decode": []}
    # The events carry the durations the histograms use.
    events = [{k.decode(): v.decode() for k, v in fields.items()}
              for _, fields in store.read_events("0", 100, None)]
    started = [e for e in events if e["event"] == "started"]
    assert started and all(e["ms"].isdigit() for e in started)
    assert all(e["ms"].isdigit() for e in events if e["event"] in ("finished", "succeeded"))


def test_a_batch_answers_each_transition_on_its_own(store):
    outcomes = store.run([
        tx.Submit("a", "noop", b"{}", "encode", b"d"),
        tx.Submit("a", "noop", b"{}", "encode", b"d"),  # the same job again
        tx.Start("missing", "encode", 1, "w", "encoding", 0),
        tx.Submit("b", "noop", b"{}", "encode", b"d"),
        tx.Start("b", "encode", 1, "w", "encoding", 0),
    ])
    assert [o.status for o in outcomes] == ["ok", "exists", "missing", "ok", "ok"]
    assert outcomes[4].values == (b"{}",)
    assert store.run([]) == []


def test_the_ended_feed_announces_each_job_end_once(store):
    from stagepool.common.jobstore import EndedFeed

    feed = EndedFeed(store)
    try:
        _submit(store, "ok")
        _submit(store, "off")
        _submit(store, "running")
        store.apply(tx.Cancel("off"))
        store.apply(tx.Start("ok", "encode", 1, "w", "encoding", 0))
        store.apply(tx.Finish("ok", "encode", 1, "w", "decode", b"d"))
        store.apply(tx.Start("ok", "decode", 1, "w", "decoding", 2))
        store.apply(tx.Complete("ok", "decode", 1, "w", b"{}"))
        assert feed.wait(["ok", "off", "running"], timeout_s=1.0) == {
            "ok": "succeeded", "off": "cancelled"}
        assert feed.next(timeout_s=0.05) is None  # nothing more, and "running" never ended
    finally:
        feed.close()




def test_each_transition_struct_is_the_argument_order_the_script_documents():
    """common/transitions.py and the header of jobs.lua name the same arguments in order."""
    import re
    from importlib import resources

    import msgspec

    source = resources.files("stagepool.common").joinpath("lua/jobs.lua").read_text()
    documented = {}
    for line in source.splitlines():
        match = re.match(r"^--   ([a-z]+) +(.*)$", line)
        if match and match.group(1) != "ARGV":
            args = re.sub(r"\(.*?\)", "", match.group(2).split("->")[0])
            documented[match.group(1)] = [a.strip() for a in args.split(",") if a.strip()]
    structs = {cls.command: [f.name for f in msgspec.structs.fields(cls)][1:]
               for cls in vars(tx).values()
               if isinstance(cls, type) and issubclass(cls, tx.Transition)
               and hasattr(cls, "command")}
    assert structs == {command: documented[command] for command in structs}
    assert len(structs) == 14


def test_the_rebuild_walk_skips_no_job_while_others_end_under_it(store):
    """`active_ids` walks by score, not offset: jobs leaving the set mid-walk (workers of a
    dead broker still ending them) never shift it past one that stays."""
    import random

    rng = random.Random(3)
    ids = [f"a{i}" for i in range(2500)]
    store.redis.zadd(store.keys.active, {job_id: i // 7 for i, job_id in enumerate(ids)})  # ties
    leaving = sorted(rng.sample(ids, 1200))
    removed: set[str] = set()
    seen: list[str] = []
    for job_id in store.active_ids(batch=100):
        seen.append(job_id)
        if len(seen) % 50 == 0:  # a burst of other jobs ends, some before, some after us
            gone = [j for j in leaving if j not in removed][:40]
            if gone:
                store.redis.zrem(store.keys.active, *gone)
                removed.update(gone)
    assert len(seen) == len(set(seen)), "a job was walked twice"
    assert set(ids) - removed <= set(seen), "the walk skipped a job that stayed"
