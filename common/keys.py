"""Every Redis key stagepool touches, in one place.

All keys of a deployment share the hash tag `{namespace}`, so they land in one Cluster slot and
the Lua scripts may touch several of them atomically. Several deployments share a Redis by
using different namespaces.

    {ns}:job:<id>     hash   the job record (fields: see jobstore.py)
    {ns}:log:<id>     list   the job's transitions, JSON each (its page), expiring with it
    {ns}:events       stream every state transition (job, event, stage, attempt, worker, ts_ms)
    {ns}:ingress      stream submissions from any language: XADD {ns}:ingress * job <json>
    {ns}:active       zset   jobs not yet terminal, scored by creation ms (broker rebuild)
    {ns}:jobs         zset   every job, scored by creation ms (listing)
    {ns}:results      zset   succeeded jobs, scored by finish ms
    {ns}:dead         list   dead-lettered job ids, newest first
    {ns}:queued:<S>   zset   jobs waiting for a worker of stage S, scored by enqueue ms
    {ns}:transfer     hash   transfer counters the workers add to: <stage>|<phase>|<backend>|<n>
    {ns}:ended        pub/sub channel: "<id> <state>" as each job ends (wait without polling)
    {ns}:autoscale    hash   `stagepool up`'s autoscaled pools: <stage>|workers, <stage>|up, |down
"""

from __future__ import annotations

INGRESS_GROUP = "stagepool"


class Keys:
    def __init__(self, namespace: str):
        if not namespace or any(ch in namespace for ch in "{}: "):
            raise ValueError(f"bad namespace {namespace!r}")
        self.namespace = namespace
        self.prefix = "{" + namespace + "}:"
        self.events = self.prefix + "events"
        self.ingress = self.prefix + "ingress"
        self.ingress_rejected = self.prefix + "ingress:rejected"  # bad entries, bounded
        self.active = self.prefix + "active"
        self.jobs = self.prefix + "jobs"
        self.results = self.prefix + "results"
        self.dead = self.prefix + "dead"
        self.transfer = self.prefix + "transfer"
        self.ended = self.prefix + "ended"
        self.delayed = self.prefix + "delayed"  # retries waiting out their backoff
        self.autoscale = self.prefix + "autoscale"  # `up`'s pools: <stage>|workers, |up, |down

    def job(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def log(self, job_id: str) -> str:
        return f"{self.prefix}log:{job_id}"

    def queued(self, stage: str) -> str:
        return f"{self.prefix}queued:{stage}"
