-- stagepool job state machine: every transition of a job record, atomically.
--
-- One call runs a batch of transitions, in order (a worker commits a batch of dispatches, the
-- broker a batch of submits, in one round trip); each is independent of the others' outcome.
--
-- KEYS (one hash tag, one Cluster slot):
--   1 {ns}:events     stream transitions
--   2 {ns}:active     zset   non-terminal jobs (score: created ms)
--   3 {ns}:jobs       zset   all jobs (score: created ms)
--   4 {ns}:results    zset   succeeded jobs (score: finished ms)
--   5 {ns}:dead       list   dead-lettered ids
--   5+i {ns}:job:<id> hash   the record of transition i
--
-- ARGV[1] = events stream MAXLEN (approximate), ARGV[2] = retention ms of an ended job's record
-- (0: kept until purged); then per transition: n (the count of items
-- that follow), command, job id, and the command's arguments, in the order of its struct in
-- common/transitions.py (the one definition every caller builds from):
--   submit   pipeline, params_json, first_stage, dispatch, priority, deadline_ms
--   start    stage, attempt, worker, state, stage_index                -> ok, params_json
--            (or expired: the job's deadline_ms passed before this stage could start)
--   finish   stage, attempt, worker, next_stage, next_dispatch         -> ok, next attempt
--   complete stage, attempt, worker, result_json
--   retry    stage, attempt, worker, error, max_attempts, mode, next_stage, backoff_ms, backoff_max_ms
--            (mode: "error", "crash" (an expired lease) or "fatal" (fail the job at once);
--            an "error" retry with a backoff waits in {ns}:delayed -> delayed, attempt, ms)
--   due      (none; the job id is "" and not used) -> the delayed retries now due, each
--            "stage attempt dispatch" after its job id, removed from {ns}:delayed
--   rewind   stage, attempt, worker, error, prev_stage, prev_index, max_attempts
--            (the stage's inputs are gone with their producer: run prev_stage again)
--   progress stage, attempt, step, steps
--   rebuild  stages (the stage names in pipeline order, each its own argument)
--   cancel   (none)
--   reject   error   (an ingress entry whose job id is valid but whose body is not)
--   revive   (none) -> retry, attempt, dispatch, stage
--            (an ended job (failed, dead, cancelled, expired) runs again from the stage it
--            ended in, with a fresh attempt and its retries reset)
--   purge    state, before_ms -> ok
--            (an ended job in `state` ("": any) that ended before before_ms: deleted)
--   trim     (none; the job id is "" and not used) -> ok, count
--            (up to 1000 ids in `jobs`/`results` whose record has expired, forgotten)
--
-- A job's state names what is happening: `queued:<stage>` while it waits for a worker of that
-- stage, the stage's running state (e.g. `denoising`) while one runs it, then its end.
-- An ended job's record expires ARGV[2] ms after it ended (then `trim` forgets its id).
-- Each transition is also appended to the job's own history, {ns}:log:<id> (a list of JSON
-- objects: event, stage, attempt, worker, detail, ts_ms, ms; the newest 200), which expires
-- with the record.
--
-- Record fields: id, pipeline, params, priority, deadline_ms, state, state_index, stage, created_ms,
-- updated_ms, error, result, commits, and per stage S:
--   S.attempt      the attempt currently dispatched: a fencing token, only the holder of the
--                  current attempt may start, finish or fail the stage
--   S.started      the attempt that has started (at most one start per attempt)
--   S.done         the attempt whose result was committed (at most one per stage)
--   S.retries      failed attempts so far (errors and expired leases; not broker restarts)
--   S.worker, S.enqueued_ms, S.started_ms, S.finished_ms
--   S.dispatch     the msgpack Dispatch that (re)starts the stage, kept for republishing
--
--   S.step         "i/n" progress of the running attempt (denoise steps)
--   S.rewinds      times the stage's inputs were lost and the previous stage ran again
--
-- Besides the record, every command keeps {ns}:queued:<stage> (zset: job ids waiting for a
-- worker of that stage, scored by enqueue ms) exact: a job enters it when its stage is
-- dispatched and leaves it when the stage starts or the job ends. Its name is derived from
-- KEYS[2] ({ns}:active), so it shares the hash tag and slot. Queue depth and the age of the
-- oldest waiting job per stage are ZCARD and ZRANGE 0 0 of it, from any reader.
--
-- A job's end (succeeded, failed, cancelled, dead, expired) is also published on {ns}:ended as
-- "<id> <state>", so a client can wait for its jobs without polling or reading every event.
--
-- Events carry `ms`: on `started`, the time the stage waited (enqueue to start); on `finished`
-- and `succeeded`, the time it ran (start to commit).
--
-- The reply has one array per transition, whose first element is a status string: ok, exists,
-- missing, terminal, duplicate, stale, retry, republish, dead, failed.

local events, active, jobs, results, dead = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local maxlen = ARGV[1]
local retention_ms = tonumber(ARGV[2])
local job, id  -- the record and id of the transition being run

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local terminal = {succeeded = true, failed = true, cancelled = true, dead = true,
  expired = true}
local queued_prefix = string.sub(active, 1, -7) .. 'queued:'
local ended_channel = string.sub(active, 1, -7) .. 'ended'
local delayed = string.sub(active, 1, -7) .. 'delayed'
local log_prefix = string.sub(active, 1, -7) .. 'log:'

local function event(name, stage, attempt, worker, detail, ms)
  redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*', 'job', id, 'event', name,
    'stage', stage or '', 'attempt', attempt or '', 'worker', worker or '', 'detail', detail or '',
    'ts_ms', now_ms, 'ms', ms or '')
  -- The job's own history, for its page: the same entry, kept (and expiring) with its record.
  local log = log_prefix .. id
  local length = redis.call('RPUSH', log, cjson.encode({event = name, stage = stage or '',
    attempt = attempt or '', worker = worker or '', detail = detail or '', ts_ms = now_ms,
    ms = ms ~= '' and ms or nil}))
  if length > 200 then redis.call('LTRIM', log, -200, -1) end
end

local function expire_record()
  if retention_ms > 0 then
    redis.call('PEXPIRE', job, retention_ms)
    redis.call('PEXPIRE', log_prefix .. id, retention_ms)
  end
end

local function enqueue(stage, keep_age)
  if keep_age then
    redis.call('ZADD', queued_prefix .. stage, 'NX', now_ms, id)
  else
    redis.call('ZADD', queued_prefix .. stage, now_ms, id)
  end
end

local function dequeue(stage)
  if stage and stage ~= '' then redis.call('ZREM', queued_prefix .. stage, id) end
end

-- Milliseconds since the record's `field` (a ms timestamp), or '' if it has none.
local function since(field)
  local t = tonumber(redis.call('HGET', job, field))
  if not t then return '' end
  return now_ms - t
end

local function finish_job(state, stage, attempt, worker, detail, ms)
  dequeue(redis.call('HGET', job, 'stage'))
  redis.call('HSET', job, 'state', state, 'updated_ms', now_ms)
  redis.call('ZREM', active, id)
  event(state, stage, attempt, worker, detail, ms)
  expire_record()
  redis.call('PUBLISH', ended_channel, id .. ' ' .. state)
end

-- The checks every stage-scoped command shares (one HMGET); nil when the caller may proceed.
local function fence(stage, attempt, want_started)
  local f = redis.call('HMGET', job, 'state', stage .. '.done', stage .. '.attempt',
    stage .. '.started')
  local state = f[1]
  if not state then return {'missing'} end
  if terminal[state] then return {'terminal', state} end
  if f[2] then return {'duplicate'} end
  if f[3] ~= attempt then return {'stale'} end
  if want_started and f[4] ~= attempt then return {'stale'} end
  return nil, f[4]
end

local commands = {}

function commands.submit(a)
  local pipeline, params, first, dispatch, priority = a[1], a[2], a[3], a[4], a[5]
  local deadline_ms = tonumber(a[6])
  local state = redis.call('HGET', job, 'state')
  if state then return {'exists', state} end
  if deadline_ms > 0 then redis.call('HSET', job, 'deadline_ms', deadline_ms) end
  redis.call('HSET', job, 'id', id, 'pipeline', pipeline, 'params', params, 'priority', priority,
    'state', 'queued:' .. first, 'state_index', -1, 'stage', first, 'created_ms', now_ms,
    'updated_ms', now_ms, 'commits', 0, first .. '.attempt', '1', first .. '.retries', 0,
    first .. '.enqueued_ms', now_ms, first .. '.dispatch', dispatch)
  redis.call('ZADD', active, now_ms, id)
  redis.call('ZADD', jobs, now_ms, id)
  enqueue(first)
  event('submitted', first, '1')
  return {'ok', 'queued:' .. first}
end

function commands.start(a)
  local stage, attempt, worker, state_name, index = a[1], a[2], a[3], a[4], tonumber(a[5])
  local refused, started = fence(stage, attempt, false)
  if refused then return refused end
  -- A duplicate delivery of an attempt that already started (a republished hand-on).
  if started == attempt then return {'duplicate'} end
  local f = redis.call('HMGET', job, stage .. '.enqueued_ms', 'state_index', 'params',
    'deadline_ms')
  local deadline_ms = tonumber(f[4])
  if deadline_ms and now_ms > deadline_ms then
    local err = 'deadline passed ' .. (now_ms - deadline_ms) .. ' ms before ' .. stage ..
      ' could start'
    redis.call('HSET', job, 'error', err)
    finish_job('expired', stage, attempt, worker, err)
    return {'expired'}
  end
  local enqueued_ms = tonumber(f[1])
  local waited_ms = enqueued_ms and math.max(0, now_ms - enqueued_ms) or ''
  redis.call('HSET', job, stage .. '.started', attempt, stage .. '.worker', worker,
    stage .. '.started_ms', now_ms, 'updated_ms', now_ms)
  dequeue(stage)
  -- Stages start in order, but a late retry of an earlier stage never moves the state back.
  if index >= tonumber(f[2]) then
    redis.call('HSET', job, 'state', state_name, 'state_index', index)
  end
  event('started', stage, attempt, worker, '', waited_ms)
  return {'ok', f[3]}
end

function commands.finish(a)
  local stage, attempt, worker, next_stage, dispatch = a[1], a[2], a[3], a[4], a[5]
  local refused = fence(stage, attempt, true)
  if refused then return refused end
  -- Attempts only grow: after a rewind the next stage may have used attempts already, and a
  -- reused number would be refused by start as a duplicate.
  local next_attempt = redis.call('HINCRBY', job, next_stage .. '.attempt', 1)
  redis.call('HINCRBY', job, next_stage .. '.retries', 0)
  local ran_ms = since(stage .. '.started_ms')
  redis.call('HSET', job, stage .. '.done', attempt, stage .. '.finished_ms', now_ms,
    'stage', next_stage, 'state', 'queued:' .. next_stage, 'updated_ms', now_ms,
    next_stage .. '.enqueued_ms', now_ms, next_stage .. '.dispatch', dispatch)
  enqueue(next_stage)
  event('finished', stage, attempt, worker, '', ran_ms)
  return {'ok', tostring(next_attempt)}
end

function commands.complete(a)
  local stage, attempt, worker, result = a[1], a[2], a[3], a[4]
  local refused = fence(stage, attempt, true)
  if refused then return refused end
  local ran_ms = since(stage .. '.started_ms')
  redis.call('HSET', job, stage .. '.done', attempt, stage .. '.finished_ms', now_ms,
    'result', result)
  redis.call('HINCRBY', job, 'commits', 1)
  redis.call('ZADD', results, now_ms, id)
  finish_job('succeeded', stage, attempt, worker, '', ran_ms)
  return {'ok'}
end

function commands.retry(a)
  local stage, attempt, worker, err = a[1], a[2], a[3], a[4]
  local max_attempts, mode, next_stage = tonumber(a[5]), a[6], a[7]
  local refused = fence(stage, attempt, false)
  if refused then
    -- A worker that committed its stage and died before handing on: the hand-on is in the
    -- record, so publish it again unless the next stage has started (duplicates are fenced).
    if refused[1] == 'duplicate' and mode == 'crash' and next_stage ~= ''
        and not redis.call('HGET', job, next_stage .. '.started') then
      return {'republish', next_stage, redis.call('HGET', job, next_stage .. '.attempt'),
        redis.call('HGET', job, next_stage .. '.dispatch')}
    end
    return refused
  end
  local retries = redis.call('HINCRBY', job, stage .. '.retries', 1)
  redis.call('HSET', job, 'error', err, 'updated_ms', now_ms)
  if retries >= max_attempts or mode == 'fatal' then
    if mode == 'crash' then
      redis.call('LPUSH', dead, id)
      finish_job('dead', stage, attempt, worker, err)
      return {'dead'}
    end
    finish_job('failed', stage, attempt, worker, err)
    return {'failed'}
  end
  local next_attempt = tostring(tonumber(attempt) + 1)
  redis.call('HSET', job, stage .. '.attempt', next_attempt, stage .. '.enqueued_ms', now_ms)
  if redis.call('HGET', job, 'stage') == stage then
    redis.call('HSET', job, 'state', 'queued:' .. stage)
  end
  enqueue(stage)
  local backoff_ms = tonumber(a[8]) or 0
  if mode == 'error' and backoff_ms > 0 then
    local wait_ms = math.min(tonumber(a[9]), backoff_ms * 2 ^ (retries - 1))
    redis.call('ZADD', delayed, now_ms + wait_ms, id .. ' ' .. stage .. ' ' .. next_attempt)
    event('retried', stage, next_attempt, worker, err, wait_ms)
    return {'delayed', next_attempt, tostring(wait_ms)}
  end
  event('retried', stage, next_attempt, worker, err)
  return {'retry', next_attempt, redis.call('HGET', job, stage .. '.dispatch')}
end

function commands.rewind(a)
  local stage, attempt, worker, err = a[1], a[2], a[3], a[4]
  local prev, prev_index, max_attempts = a[5], a[6], tonumber(a[7])
  local refused = fence(stage, attempt, true)
  if refused then return refused end
  local dispatch = redis.call('HGET', job, prev .. '.dispatch')
  if not dispatch then return {'missing'} end
  -- Fence off this stage's attempt: the producer's stage hands on a fresh one when it is done.
  redis.call('HINCRBY', job, stage .. '.attempt', 1)
  redis.call('HINCRBY', job, stage .. '.rewinds', 1)
  local retries = redis.call('HINCRBY', job, prev .. '.retries', 1)
  redis.call('HSET', job, 'error', err, 'updated_ms', now_ms)
  if retries >= max_attempts then
    finish_job('failed', stage, attempt, worker, err)
    return {'failed'}
  end
  local prev_attempt = redis.call('HINCRBY', job, prev .. '.attempt', 1)
  redis.call('HDEL', job, prev .. '.done')
  redis.call('HSET', job, 'state', 'queued:' .. prev, 'state_index', prev_index, 'stage', prev,
    prev .. '.enqueued_ms', now_ms)
  dequeue(stage)
  enqueue(prev)
  event('rewound', prev, tostring(prev_attempt), worker, err)
  return {'retry', tostring(prev_attempt), dispatch}
end

-- Also the running stage's stop signal: an ended job or a superseded attempt stops it here.
function commands.progress(a)
  local stage, attempt, step, steps = a[1], a[2], a[3], a[4]
  local f = redis.call('HMGET', job, 'state', stage .. '.attempt')
  if not f[1] then return {'missing'} end
  if terminal[f[1]] then return {'terminal', f[1]} end
  if f[2] ~= attempt then return {'stale'} end
  -- The step lives in the record only: a stream entry per step would crowd out transitions.
  redis.call('HSET', job, stage .. '.step', step .. '/' .. steps, 'updated_ms', now_ms)
  return {'ok'}
end

-- The delayed retries now due: removed from the set, and each one still current returned as
-- its job id, stage, attempt and dispatch (a cancelled job's or a superseded attempt's is
-- dropped). The job key of this transition is not used.
function commands.due(a)
  local out = {'ok'}
  local job_prefix = string.sub(active, 1, -7) .. 'job:'
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', delayed, '-inf', now_ms, 'LIMIT', 0, 256)) do
    redis.call('ZREM', delayed, member)
    local jid, stage, attempt = string.match(member, '^(%S+) (.+) (%d+)$')
    if jid then
      local f = redis.call('HMGET', job_prefix .. jid, 'state', stage .. '.attempt',
        stage .. '.dispatch')
      if f[1] and not terminal[f[1]] and f[2] == attempt and f[3] then
        out[#out + 1] = jid
        out[#out + 1] = stage
        out[#out + 1] = attempt
        out[#out + 1] = f[3]
      end
    end
  end
  return out
end

function commands.rebuild(a)
  local state = redis.call('HGET', job, 'state')
  if not state or terminal[state] then
    redis.call('ZREM', active, id)
    return {'terminal', state or ''}
  end
  for _, stage in ipairs(a) do
    if redis.call('HEXISTS', job, stage .. '.done') == 0 then
      local dispatch = redis.call('HGET', job, stage .. '.dispatch')
      if not dispatch then return {'missing'} end
      -- A new attempt fences off any worker still running the old one on the lost ring.
      local next_attempt = redis.call('HINCRBY', job, stage .. '.attempt', 1)
      redis.call('HSET', job, stage .. '.enqueued_ms', now_ms, 'updated_ms', now_ms,
        'state', 'queued:' .. stage)
      enqueue(stage, true)  -- still waiting since before the restart: keep its age
      event('rebuilt', stage, tostring(next_attempt))
      return {'retry', tostring(next_attempt), dispatch, stage}
    end
  end
  return {'missing'}
end

function commands.cancel(a)
  local state = redis.call('HGET', job, 'state')
  if not state then return {'missing'} end
  if terminal[state] then return {'terminal', state} end
  finish_job('cancelled')
  return {'ok', 'cancelled'}
end

function commands.reject(a)
  local err = a[1]
  local state = redis.call('HGET', job, 'state')
  if state then return {'exists', state} end
  redis.call('HSET', job, 'id', id, 'state', 'failed', 'error', err, 'created_ms', now_ms,
    'updated_ms', now_ms)
  redis.call('ZADD', jobs, now_ms, id)
  event('failed', '', '', '', err)
  expire_record()
  return {'ok', 'failed'}
end

function commands.revive(a)
  local f = redis.call('HMGET', job, 'state', 'stage', 'created_ms')
  local state, stage = f[1], f[2]
  if not state then return {'missing'} end
  if not terminal[state] or state == 'succeeded' then return {'refused', state} end
  local dispatch = stage and redis.call('HGET', job, stage .. '.dispatch')
  if not dispatch then return {'refused', state} end  -- rejected at the door: never dispatched
  local next_attempt = redis.call('HINCRBY', job, stage .. '.attempt', 1)
  redis.call('PERSIST', job)
  redis.call('PERSIST', log_prefix .. id)
  redis.call('HDEL', job, 'error', 'deadline_ms', stage .. '.step')
  redis.call('HSET', job, 'state', 'queued:' .. stage, stage .. '.retries', 0,
    stage .. '.enqueued_ms', now_ms, 'updated_ms', now_ms)
  redis.call('ZADD', active, f[3], id)
  redis.call('LREM', dead, 0, id)
  enqueue(stage)
  event('revived', stage, tostring(next_attempt), '', state)
  return {'retry', tostring(next_attempt), dispatch, stage}
end

function commands.purge(a)
  local want, before_ms = a[1], tonumber(a[2])
  local f = redis.call('HMGET', job, 'state', 'updated_ms')
  if not f[1] then
    redis.call('ZREM', jobs, id)
    redis.call('ZREM', results, id)
    return {'missing'}
  end
  if not terminal[f[1]] or (want ~= '' and f[1] ~= want)
      or (tonumber(f[2]) or 0) >= before_ms then
    return {'kept', f[1]}
  end
  redis.call('DEL', job, log_prefix .. id)
  redis.call('ZREM', jobs, id)
  redis.call('ZREM', results, id)
  redis.call('LREM', dead, 0, id)
  return {'ok'}
end

function commands.trim(a)
  if retention_ms <= 0 then return {'ok', 0} end
  local job_prefix = string.sub(active, 1, -7) .. 'job:'
  local removed = 0
  -- Only a job created before now - retention can have ended and expired since.
  local old = redis.call('ZRANGEBYSCORE', jobs, '-inf', now_ms - retention_ms, 'LIMIT', 0, 1000)
  for _, member in ipairs(old) do
    if redis.call('EXISTS', job_prefix .. member) == 0 then
      redis.call('ZREM', jobs, member)
      redis.call('ZREM', results, member)
      redis.call('LREM', dead, 0, member)
      removed = removed + 1
    end
  end
  return {'ok', removed}
end

local replies = {}
local i, key = 3, 6
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  local cmd = ARGV[i + 1]
  job, id = KEYS[key], ARGV[i + 2]
  local fn = commands[cmd]
  if not fn then return redis.error_reply('unknown command ' .. tostring(cmd)) end
  replies[#replies + 1] = fn({unpack(ARGV, i + 3, i + n)})
  i, key = i + n + 1, key + 1
end
return replies
