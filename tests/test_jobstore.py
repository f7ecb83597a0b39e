"""The Redis job store: transitions, fencing, and multi-process commit races (real Redis)."""

from __future__ import annotations

import multiprocessing

import pytest

from stagepool.common.jobstore import JobStore

ctx = multiprocessing.get_context("spawn")


@pytest.fixture
def store(redis_server, namespace):
    s = JobStore(redis_server.url, namespace)
    yield s
    s.close()


def _submit(store, job_id="j1"):
    return store.submit(job_id, "noop", b'{"prompt": "p"}', "encode", b"dispatch-encode")


def test_the_same_job_id_submitted_twice_is_one_job(store):
    assert _submit(store).ok
    again = _submit(store)
    assert again.status == "exists"
    assert store.redis.zcard(store.keys.jobs) == 1


def test_a_job_walks_through_every_stage_to_succeeded(store):
    _submit(store)
    assert store.start("j1", "encode", 1, "w1", "encoding", 0).values[0] == b'{"prompt": "p"}'
    assert store.get("j1")["state"] == "encoding"
    assert store.finish("j1", "encode", 1, "w1", "decode", b"dispatch-decode").ok
    assert store.start("j1", "decode", 1, "w2", "decoding", 1).ok
    assert store.complete("j1", "decode", 1, "w2", {"ok": True}).ok
    record = store.get("j1")
    assert record["state"] == "succeeded" and record["commits"] == "1"
    assert store.redis.zscore(store.keys.results, "j1") is not None
    assert store.redis.zscore(store.keys.active, "j1") is None


def test_a_stale_attempt_cannot_start_or_commit(store):
    _submit(store)
    store.start("j1", "encode", 1, "w1", "encoding", 0)
    outcome = store.retry("j1", "encode", 1, "broker", "lease expired", 3, crash=True)
    assert outcome.status == "retry" and outcome.values[0] == b"2"
    assert store.finish("j1", "encode", 1, "w1", "decode", b"d").status == "stale"
    assert store.start("j1", "encode", 2, "w2", "encoding", 0).ok
    assert store.start("j1", "encode", 2, "w3", "encoding", 0).status == "duplicate"


def test_crashes_past_max_attempts_dead_letter_the_job(store):
    _submit(store)
    assert store.retry("j1", "encode", 1, "b", "boom", 2, crash=True).status == "retry"
    assert store.retry("j1", "encode", 2, "b", "boom", 2, crash=True).status == "dead"
    assert store.get("j1")["state"] == "dead"
    assert store.redis.lrange(store.keys.dead, 0, -1) == [b"j1"]


def test_errors_past_max_attempts_fail_the_job_with_its_error(store):
    _submit(store)
    store.retry("j1", "encode", 1, "w", "ValueError: bad", 1, crash=False)
    record = store.get("j1")
    assert record["state"] == "failed" and record["error"] == "ValueError: bad"


def test_a_committed_but_undelivered_hand_on_is_republished(store):
    _submit(store)
    store.start("j1", "encode", 1, "w1", "encoding", 0)
    store.finish("j1", "encode", 1, "w1", "decode", b"dispatch-decode")
    # The worker died before publishing into the decode ring; its lease expires.
    outcome = store.retry("j1", "encode", 1, "broker", "lease expired", 3, crash=True,
                          next_stage="decode")
    assert outcome.status == "republish"
    assert outcome.values == (b"decode", b"1", b"dispatch-decode")


def test_a_cancelled_job_refuses_further_stages(store):
    _submit(store)
    assert store.cancel("j1").ok
    assert store.start("j1", "encode", 1, "w", "encoding", 0).status == "terminal"
    assert store.cancel("j1").status == "terminal"


def test_rebuild_fences_off_the_attempt_running_before_a_restart(store):
    _submit(store)
    store.start("j1", "encode", 1, "w1", "encoding", 0)
    outcome = store.rebuild("j1", ["encode", "decode"])
    assert outcome.status == "retry" and outcome.values[0] == b"2"
    assert store.finish("j1", "encode", 1, "w1", "decode", b"d").status == "stale"


def _race_complete(store, worker):
    return store.complete("race", "decode", 1, f"w{worker}", {"w": worker}).status


def _race_pass(store, worker):
    """Each contender passes the last stage of its own copy of one delivery."""
    return store.run_batch([JobStore.pass_args("race", "decode", 1, f"w{worker}", "decoding", 2,
                                               0, "", b'{"by": %d}' % worker)])[0].status


def _race_start(store, worker):
    return store.start("race", "encode", 1, f"w{worker}", "encoding", 0).status


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


def test_five_processes_committing_one_result_exactly_one_wins(store, redis_server, namespace):
    store.submit("race", "noop", b"{}", "decode", b"d")
    store.start("race", "decode", 1, "w0", "decoding", 0)
    statuses = _race(redis_server, namespace, _race_complete)
    assert statuses.count("ok") == 1
    assert statuses.count("duplicate") + statuses.count("terminal") == 4
    assert store.get("race")["commits"] == "1"


def test_five_processes_starting_one_attempt_exactly_one_wins(store, redis_server, namespace):
    store.submit("race", "noop", b"{}", "encode", b"d")
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
    store.start("a", "encode", 1, "w", "encoding", 0)
    assert _queued(store)["encode"] == ["b"]
    store.finish("a", "encode", 1, "w", "denoise", b"d")
    assert _queued(store)["denoise"] == ["a"]
    store.start("a", "denoise", 1, "w", "denoising", 1)
    # A failed attempt is waiting again; a rewind sends the job back to encode's queue.
    assert store.retry("a", "denoise", 1, "w", "oom", 3, crash=False).status == "retry"
    assert _queued(store)["denoise"] == ["a"]
    store.start("a", "denoise", 2, "w", "denoising", 1)
    assert store.rewind("a", "denoise", 2, "w", "producer gone", "encode", "encoding", 0,
                        3).status == "retry"
    assert _queued(store) == {"encode": ["b", "a"], "denoise": [], "decode": []}  # oldest first
    # A rebuild (broker restart) keeps a waiting job's age; cancel and completion remove it.
    enqueued = store.redis.zscore(store.keys.queued("encode"), "b")
    assert store.rebuild("b", ["encode", "denoise", "decode"]).status == "retry"
    assert store.redis.zscore(store.keys.queued("encode"), "b") == enqueued
    store.cancel("b")
    assert _queued(store)["encode"] == ["a"]
    store.start("a", "encode", 2, "w", "encoding", 0)
    store.finish("a", "encode", 2, "w", "decode", b"d")
    store.start("a", "decode", 1, "w", "decoding", 2)
    store.complete("a", "decode", 1, "w", {})
    assert _queued(store) == {"encode": [], "denoise": [], "decode": []}
    # The events carry the durations the histograms use.
    events = [{k.decode(): v.decode() for k, v in fields.items()}
              for _, fields in store.read_events("0", 100, None)]
    started = [e for e in events if e["event"] == "started"]
    assert started and all(e["ms"].isdigit() for e in started)
    assert all(e["ms"].isdigit() for e in events if e["event"] in ("finished", "succeeded"))


def test_five_processes_passing_one_attempt_exactly_one_commits(store, redis_server, namespace):
    store.submit("race", "noop", b"{}", "decode", b"d")
    statuses = _race(redis_server, namespace, _race_pass)
    assert statuses.count("ok") == 1
    assert statuses.count("duplicate") + statuses.count("terminal") == 4, statuses
    record = store.get("race")
    assert record["commits"] == "1" and record["state"] == "succeeded"


def test_pass_starts_and_commits_a_stage_that_already_ran(store):
    _submit(store)
    store.redis.hset(store.keys.job("j1"), "encode.enqueued_ms", 0)  # waited "forever"
    [outcome] = store.run_batch([JobStore.pass_args("j1", "encode", 1, "w1", "encoding", 0, 40,
                                                    "denoise", b"dispatch-denoise")])
    assert outcome.ok and outcome.values == (b"1",)
    record = store.get("j1")
    assert record["encode.started"] == record["encode.done"] == "1"
    assert record["state"] == "encoding" and record["stage"] == "denoise"
    # The start is backdated by the worker's run time, so the events say how long it ran.
    assert int(record["encode.finished_ms"]) - int(record["encode.started_ms"]) >= 40
    events = [(f[b"event"], f[b"ms"]) for _, f in store.redis.xrange(store.keys.events)]
    assert [e for e, _ in events] == [b"submitted", b"started", b"finished"]
    assert int(events[2][1]) >= 40 and int(events[1][1]) > 0
    # The last stage's pass is the result commit.
    store.run_batch([JobStore.pass_args("j1", "denoise", 1, "w2", "denoising", 1, 0, "decode",
                                        b"d")])
    [done] = store.run_batch([JobStore.pass_args("j1", "decode", 1, "w3", "decoding", 2, 0, "",
                                                 b'{"ok": true}')])
    assert done.ok and store.get("j1")["state"] == "succeeded"
    assert store.get("j1")["result"] == '{"ok": true}'


def test_pass_is_fenced_like_start_and_finish(store):
    _submit(store, "stale")
    [outcome] = store.run_batch([JobStore.pass_args("stale", "encode", 2, "w", "encoding", 0, 0,
                                                    "denoise", b"d")])
    assert outcome.status == "stale"
    _submit(store, "gone")
    store.cancel("gone")
    [outcome] = store.run_batch([JobStore.pass_args("gone", "encode", 1, "w", "encoding", 0, 0,
                                                    "denoise", b"d")])
    assert outcome.status == "terminal"
    assert store.get("gone")["state"] == "cancelled"
    assert store.redis.zcard(store.keys.queued("denoise")) == 0


def test_a_batch_answers_each_transition_on_its_own(store):
    outcomes = store.run_batch([
        ("submit", "a", "noop", b"{}", "encode", b"d", 0),
        ("submit", "a", "noop", b"{}", "encode", b"d", 0),  # the same job again
        ("start", "missing", "encode", 1, "w", "encoding", 0),
        ("submit", "b", "noop", b"{}", "encode", b"d", 0),
        ("start", "b", "encode", 1, "w", "encoding", 0),
    ])
    assert [o.status for o in outcomes] == ["ok", "exists", "missing", "ok", "ok"]
    assert outcomes[4].values == (b"{}",)
    assert store.run_batch([]) == []


def test_the_ended_feed_announces_each_job_end_once(store):
    from stagepool.common.jobstore import EndedFeed

    feed = EndedFeed(store)
    try:
        _submit(store, "ok")
        _submit(store, "off")
        _submit(store, "running")
        store.cancel("off")
        store.start("ok", "encode", 1, "w", "encoding", 0)
        store.finish("ok", "encode", 1, "w", "decode", b"d")
        store.run_batch([JobStore.pass_args("ok", "decode", 1, "w", "decoding", 2, 0, "",
                                            b"{}")])
        assert feed.wait(["ok", "off", "running"], timeout_s=1.0) == {
            "ok": "succeeded", "off": "cancelled"}
        assert feed.next(timeout_s=0.05) is None  # nothing more, and "running" never ended
    finally:
        feed.close()


def test_a_worker_may_apply_the_brokers_submit_first_and_the_broker_then_finds_it(store):
    """A dispatch published before the broker's submit landed carries that submit: whichever
    write arrives first creates the job, the other is `exists`, and the job runs once."""
    submit = ("submit", "early", "noop", b'{"p": 1}', "encode", b"stored", 0, "tok1")
    first, passed = store.run_batch([submit, JobStore.pass_args(
        "early", "encode", 1, "w1", "encoding", 0, 0, "denoise", b"d")])
    assert first.ok and passed.ok
    # The broker's own write, arriving late, still says it created the job (same token); a
    # different submit of the same id (another request) says the job existed.
    assert store.run_batch([submit])[0].ok
    assert store.submit("early", "noop", b"{}", "encode", b"d", token="tok2").status == "exists"
    assert store.submit("early", "noop", b"{}", "encode", b"d").status == "exists"
    record = store.get("early")
    assert record["encode.done"] == "1" and record["stage"] == "denoise"
    assert record["params"] == '{"p": 1}'
    # The other order: the broker's submit first, the worker's copy is a no-op.
    store.run_batch([("submit", "late", "noop", b"{}", "encode", b"stored", 0, "tok3")])
    again, passed = store.run_batch([("submit", "late", "noop", b"{}", "encode", b"stored", 0,
                                      "tok3"),
                                     JobStore.pass_args("late", "encode", 1, "w1", "encoding",
                                                        0, 0, "denoise", b"d")])
    assert again.ok and passed.ok


def test_commits_carried_down_the_chain_land_once_in_any_order(store):
    """Hand-ons that went out before their commits: each stage applies what its record
    carries, then its own. Late originals are no-ops; the result is committed once."""
    submit = ("submit", "c", "noop", b"{}", "encode", b"d1", 0, "tok")
    pass1 = JobStore.pass_args("c", "encode", 1, "w1", "encoding", 0, 0, "denoise", b"d2")
    pass2 = JobStore.pass_args("c", "denoise", 1, "w2", "denoising", 1, 0, "decode", b"d3")
    done = JobStore.pass_args("c", "decode", 1, "w3", "decoding", 2, 0, "", b'{"r": 1}')
    # Only the last worker's batch arrives (everyone else's write is late).
    outcomes = store.run_batch([submit, pass1, pass2, done])
    assert [o.status for o in outcomes] == ["ok", "ok", "ok", "ok"]
    # The late originals: the broker's submit (same token), then the workers' own commits.
    assert [o.status for o in store.run_batch([submit, pass1])] == ["ok", "terminal"]
    assert store.run_batch([pass2])[0].status == "terminal"
    record = store.get("c")
    assert record["state"] == "succeeded" and record["commits"] == "1"
    events = [f[b"event"] for _, f in store.redis.xrange(store.keys.events)]
    assert events.count(b"succeeded") == 1 and events.count(b"finished") == 2
    # A hand-on that named the next stage's attempt too early is refused there.
    store.run_batch([("submit", "r", "noop", b"{}", "encode", b"d1", 0, "t"), JobStore.pass_args(
        "r", "encode", 1, "w1", "encoding", 0, 0, "denoise", b"d2")])
    store.redis.hset(store.keys.job("r"), "denoise.attempt", 2)  # as after a retry
    stale = JobStore.pass_args("r", "denoise", 1, "w2", "denoising", 1, 0, "decode", b"d3")
    assert store.run_batch([stale])[0].status == "stale"
