"""Per-key quotas in Redis, checked and charged in one atomic Lua step.

Three limits per subject (an API key's owner id, or ``ip:<address>`` for anonymous callers):

* ``requests_per_minute``: job submissions, a token bucket of that capacity refilled
  at ``limit / 60`` per second;
* ``pixel_steps_per_minute``: work, ``width * height * steps * n`` per job, a token
  bucket likewise;
* ``concurrent_jobs``: jobs queued or running, a sorted set of job ids scored by a
  deadline. A job leaves the set when it reaches a terminal status
  (:meth:`ldm_serve.jobstore.JobStore.transition` removes it in its own Lua step);
  a member whose deadline passed is dropped, and when the set looks full every member
  is re-checked against its job record (gone, terminal, or queued beyond the queue TTL:
  dropped), so a job that vanished never holds a slot for ever.

A refused request charges nothing. Redis keys (``P`` = ``Settings.redis_prefix``)::

    P:quota:{subject}:rpm     hash  token bucket of submissions (tokens, ts)
    P:quota:{subject}:work    hash  token bucket of pixel-steps (tokens, ts)
    P:quota:{subject}:active  zset  job ids queued or running, scored by a deadline
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from ldm_serve.api_keys import KeyPolicy
from ldm_serve.contract import TERMINAL_STATUSES, Keys

WINDOW_S = 60

# KEYS: rpm bucket, work bucket, active set.
# ARGV: rpm limit, work limit, work cost, concurrency limit, job id, slot lifetime (s),
#       job key prefix ("P:job:"), terminal statuses (comma list), now (s; "" = server TIME),
#       queue TTL (s: a job queued longer has expired, whether or not anyone noticed yet).
# Returns {ok, which, limit, remaining, reset_s, retry_after_s}; which is "" on success
# (then limit/remaining/reset describe the submissions bucket).
_ADMIT_LUA = """
local now
if ARGV[9] ~= '' then now = tonumber(ARGV[9]) else
  local t = redis.call('TIME'); now = tonumber(t[1]) + tonumber(t[2]) / 1e6
end
local window = 60

local function level(key, limit)
  local v = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens = tonumber(v[1]) or limit
  local ts = tonumber(v[2]) or now
  return math.min(limit, tokens + math.max(0, now - ts) * limit / window)
end

local function reset_s(limit, tokens)
  return math.ceil((limit - tokens) * window / limit)
end

local rpm_limit = tonumber(ARGV[1])
local work_limit = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local conc_limit = tonumber(ARGV[4])

local rpm = 0
if rpm_limit > 0 then
  rpm = level(KEYS[1], rpm_limit)
  if rpm < 1 then
    return {0, 'requests_per_minute', rpm_limit, 0, reset_s(rpm_limit, rpm),
            math.ceil((1 - rpm) * window / rpm_limit)}
  end
end
local work = 0
if work_limit > 0 then
  work = level(KEYS[2], work_limit)
  if work < cost then
    return {0, 'pixel_steps_per_minute', work_limit, math.floor(work), reset_s(work_limit, work),
            math.ceil((cost - work) * window / work_limit)}
  end
end
if conc_limit > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= conc_limit then
    local terminal = {}
    for s in string.gmatch(ARGV[8], '[^,]+') do terminal[s] = true end
    local queue_ttl = tonumber(ARGV[10])
    for _, id in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
      local rec = redis.call('HMGET', ARGV[7] .. id, 'status', 'created_at')
      local st, created = rec[1], tonumber(rec[2])
      if (not st) or terminal[st] or (st == 'queued' and created and now - created > queue_ttl) then
        redis.call('ZREM', KEYS[3], id)
      end
    end
    if redis.call('ZCARD', KEYS[3]) >= conc_limit then
      return {0, 'concurrent_jobs', conc_limit, 0, -1, -1}
    end
  end
end

local ttl = window * 2
if rpm_limit > 0 then
  rpm = rpm - 1
  redis.call('HSET', KEYS[1], 'tokens', tostring(rpm), 'ts', tostring(now))
  redis.call('EXPIRE', KEYS[1], ttl)
end
if work_limit > 0 then
  redis.call('HSET', KEYS[2], 'tokens', tostring(work - cost), 'ts', tostring(now))
  redis.call('EXPIRE', KEYS[2], ttl)
end
if conc_limit > 0 then
  local lifetime = tonumber(ARGV[6])
  redis.call('ZADD', KEYS[3], now + lifetime, ARGV[5])
  local keep = redis.call('TTL', KEYS[3])
  if keep < lifetime then redis.call('EXPIRE', KEYS[3], math.ceil(lifetime)) end
end
if rpm_limit > 0 then
  return {1, '', rpm_limit, math.floor(rpm), reset_s(rpm_limit, rpm), 0}
end
return {1, '', 0, 0, 0, 0}
"""


@dataclass(frozen=True)
class QuotaDecision:
    """Outcome of :meth:`QuotaLimiter.admit`.

    ``limit`` / ``remaining`` / ``reset_s`` describe the limit that refused the job
    (``which``), or on success the submissions bucket (``limit == 0``: unlimited).
    ``retry_after_s`` is None when the wait cannot be computed (concurrency: it depends
    on when a job of the caller ends).
    """

    admitted: bool
    which: str | None
    limit: int
    remaining: int
    reset_s: int | None
    retry_after_s: int | None


class QuotaLimiter:
    """Atomic admission of jobs against a :class:`~ldm_serve.api_keys.KeyPolicy`."""

    def __init__(self, connection: redis.Redis, keys: Keys) -> None:
        self._redis = connection
        self._keys = keys
        self._admit = connection.register_script(_ADMIT_LUA)

    def rpm_key(self, subject: str) -> str:
        return f"{self._keys.prefix}:quota:{subject}:rpm"

    def work_key(self, subject: str) -> str:
        return f"{self._keys.prefix}:quota:{subject}:work"

    def active_key(self, subject: str) -> str:
        """The sorted set of a subject's queued and running jobs (recorded on the job as ``quota_key``)."""
        return f"{self._keys.prefix}:quota:{subject}:active"

    def admit(
        self,
        subject: str,
        policy: KeyPolicy,
        job_id: str,
        pixel_steps: int,
        slot_lifetime_s: float,
        now: float | None = None,
        queue_ttl_s: float = float("inf"),
    ) -> QuotaDecision:
        """Charge one submission of ``pixel_steps`` work and take a concurrency slot for ``job_id``,
        all or nothing.

        Args:
            subject: whose quota (owner id, or ``ip:<addr>``).
            policy: the limits.
            job_id: the job that takes the slot.
            pixel_steps: ``width * height * steps * n`` of the job.
            slot_lifetime_s: longest the job can stay queued or running; its slot is
                dropped after that even if nobody ends it.
            now: unix seconds for tests; default: the Redis server's clock.
            queue_ttl_s: a job queued longer than this has expired and holds no slot.
        """
        res = self._admit(
            keys=[self.rpm_key(subject), self.work_key(subject), self.active_key(subject)],
            args=[
                policy.requests_per_minute,
                policy.pixel_steps_per_minute,
                pixel_steps,
                policy.concurrent_jobs,
                job_id,
                slot_lifetime_s,
                self._keys.job(""),
                ",".join(sorted(TERMINAL_STATUSES)),
                "" if now is None else repr(now),
                repr(float(queue_ttl_s)) if queue_ttl_s != float("inf") else "1e18",
            ],
        )
        ok, which, limit, remaining, reset_s, retry = (int(res[0]), _str(res[1]), *(int(x) for x in res[2:]))
        return QuotaDecision(
            admitted=bool(ok),
            which=which or None,
            limit=limit,
            remaining=max(0, remaining),
            reset_s=None if reset_s < 0 else reset_s,
            retry_after_s=None if retry < 0 else max(1, retry) if not ok else 0,
        )

    def release(self, subject: str, job_id: str) -> None:
        """Give back a job's concurrency slot (a job that was admitted but never queued)."""
        self._redis.zrem(self.active_key(subject), job_id)

    def active(self, subject: str) -> list[str]:
        """Ids holding a concurrency slot of ``subject`` (deadline not yet passed; for tests and debugging)."""
        return sorted(_str(x) for x in self._redis.zrange(self.active_key(subject), 0, -1))


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
