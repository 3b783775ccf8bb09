//! Every Lua script Sluice runs in Redis, in this one file.
//!
//! Both scripts start with the same helper text ([`lua_prelude!`]), so the
//! admin view computes window ids and resets exactly as the decision does.
//!
//! Time comes from Redis `TIME` (one clock for every service replica) plus a
//! test offset in milliseconds. Windows are UTC calendar windows:
//! hour id `YYYYMMDDHH`, day id `YYYYMMDD`, month id `YYYYMM`; a window resets
//! at the start of the next one (real month lengths, leap years included).
//!
//! Numbers are Lua doubles: limits and costs are bounded in Rust
//! (`config::MAX_LIMIT`, `MAX_COST`) so every sum stays exact.

/// Shared helpers: civil-date arithmetic, the clock, window ids and the
/// resolution of a tenant's limits. Expands to a string literal so it can be
/// `concat!`ed in front of each script body.
macro_rules! lua_prelude {
    () => {
        r#"
local WINDOWS = {'hour', 'day', 'month'}

-- Days since 1970-01-01 of a proleptic Gregorian date. Eras of 400 years
-- repeat exactly, and counting years from March puts the leap day last, so
-- month lengths reduce to one linear formula.
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

-- Inverse of days_from_civil.
local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp + 3
  if mp >= 10 then m = mp - 9 end
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m, d
end

-- Milliseconds since the epoch as every replica sees it: Redis TIME + offset.
local function now_ms(offset_ms)
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + offset_ms
end

-- Window id and reset epoch (seconds) of each calendar window containing ms.
local function windows_at(ms)
  local s = math.floor(ms / 1000)
  local days = math.floor(s / 86400)
  local h = math.floor((s - days * 86400) / 3600)
  local y, m, d = civil_from_days(days)
  local ny, nm = y, m + 1
  if nm > 12 then ny, nm = y + 1, 1 end
  return {
    hour = {id = string.format('%04d%02d%02d%02d', y, m, d, h), reset = days * 86400 + (h + 1) * 3600},
    day = {id = string.format('%04d%02d%02d', y, m, d), reset = (days + 1) * 86400},
    month = {id = string.format('%04d%02d', y, m), reset = days_from_civil(ny, nm, 1) * 86400},
  }
end

-- Whole seconds until reset, rounded up so a client that waits this long is
-- never early; at least 1.
local function reset_in(reset, ms)
  local r = math.ceil((reset * 1000 - ms) / 1000)
  if r < 1 then r = 1 end
  return r
end

-- A tenant's cfg hash as a table (field -> string).
local function read_cfg(cfg_key)
  local flat = redis.call('HGETALL', cfg_key)
  local cfg = {}
  for i = 1, #flat, 2 do cfg[flat[i]] = flat[i + 1] end
  return cfg
end

-- The tenant's tier name and definition; a tier name the tiers no longer
-- know (a deleted tier) falls back to the default tier.
local function pick_tier(cfg, tiers, default_tier)
  local tier = cfg['tier']
  if not tier or tiers[tier] == nil then tier = default_tier end
  return tier, tiers[tier] or {}
end

-- An override `o:<name>` = '<value>:<until_ms>' that has not expired at ms.
local function active_override(cfg, name, ms)
  local o = cfg['o:' .. name]
  if not o then return nil, 0 end
  local v, u = string.match(o, '^(%d+):(%d+)$')
  if v and tonumber(u) > ms then return tonumber(v), tonumber(u) end
  return nil, 0
end

-- Effective value of limit `name`: an unexpired override, else the custom
-- limit, else the tier's value, else nil (not enforced). Also says where it
-- came from and, for an override, until when (ms).
local function effective(cfg, tier_def, name, ms)
  local ov, until_ms = active_override(cfg, name, ms)
  if ov then return ov, 'override', until_ms end
  local c = tonumber(cfg[name] or '')
  if c then return c, 'custom', 0 end
  local t = tier_def[name]
  if type(t) == 'number' then return t, 'tier', 0 end
  return nil, 'none', 0
end

-- The reserved pool of the tenant (its own, else its tier's), '' for none.
local function pick_pool(cfg, tier_def)
  if cfg['pool'] and cfg['pool'] ~= '' then return cfg['pool'] end
  if type(tier_def['reserved_pool']) == 'string' then return tier_def['reserved_pool'] end
  return ''
end

local function fmt_int(n) return string.format('%.0f', n) end

-- Token windows: the limit's name and the calendar window it counts in.
local TOKEN_WINDOWS = {{name = 'tokens_hour', window = 'hour'}, {name = 'tokens_month', window = 'month'}}
"#
    };
}

/// The audit-log helper, appended to the scripts that write audit entries.
macro_rules! lua_audit {
    () => {
        r#"
-- Appends one entry to the audit stream `key`: field `ts` (ms, the clock of
-- the scripts) then the field/value pairs ARGV[from], ARGV[from+1], ...
-- The entry id carries the same ms (so time-range reads are id ranges)
-- unless the stream already holds a later id (the test clock went back),
-- where Redis picks the next id. Then trims entries older than the
-- retention and lets the whole stream expire a retention after the last write.
local function audit_add(key, ms, retention_ms, from)
  local fields = {'ts', fmt_int(ms)}
  local i = from
  while ARGV[i] do
    table.insert(fields, ARGV[i])
    table.insert(fields, ARGV[i + 1] or '')
    i = i + 2
  end
  local id = redis.pcall('XADD', key, fmt_int(ms) .. '-*', unpack(fields))
  if type(id) == 'table' and id.err then
    id = redis.call('XADD', key, '*', unpack(fields))
  end
  redis.call('XTRIM', key, 'MINID', fmt_int(ms - retention_ms))
  redis.call('PEXPIRE', key, fmt_int(retention_ms))
  return id
end
"#
    };
}

/// Helpers of the upstream (capacity and queue) scripts: every key they
/// touch is `<prefix><suffix>` with the prefix `sluice:{u:<upstream>}:`
/// (keys::upstream_prefix), so each script stays in the upstream's slot.
macro_rules! lua_upstream {
    () => {
        r#"
-- Tokens in a bucket of size burst refilled at rate per second, as of ms
-- (a missing bucket is full). Hash fields: tok, ts.
local function bucket_level(key, rate, burst, ms)
  local b = redis.call('HMGET', key, 'tok', 'ts')
  local tok, ts = tonumber(b[1]), tonumber(b[2])
  if not tok or not ts then return burst end
  if ms > ts then tok = tok + (ms - ts) * rate / 1000 end
  if tok > burst then tok = burst end
  return tok
end

local function bucket_set(key, tok, ms, ttl_ms)
  redis.call('HSET', key, 'tok', tostring(tok), 'ts', ms)
  redis.call('PEXPIRE', key, math.max(1, math.ceil(ttl_ms)))
end

-- A tenant seen within ACTIVE_MS counts as active for fair shares; usage is
-- an exponentially decayed request count with time constant TAU_MS.
local ACTIVE_MS = 2000
local TAU_MS = 2000
-- cap, act, aw and use vanish an hour after an upstream's last request.
local STATE_TTL_MS = 3600000

-- Marks tenant active with weight w, forgets tenants idle for ACTIVE_MS (at
-- most 32 per call: bounded work), returns the weight sum of active tenants.
local function up_touch(pfx, tenant, w, ms)
  local act, aw, use = pfx .. 'act', pfx .. 'aw', pfx .. 'use'
  local wsum = tonumber(redis.call('HGET', aw, '#sum') or '0') or 0
  for _, t in ipairs(redis.call('ZRANGEBYSCORE', act, '-inf', ms - ACTIVE_MS, 'LIMIT', 0, 32)) do
    redis.call('ZREM', act, t)
    wsum = wsum - (tonumber(redis.call('HGET', aw, t) or '0') or 0)
    redis.call('HDEL', aw, t)
    redis.call('HDEL', use, t)
  end
  local old = tonumber(redis.call('HGET', aw, tenant) or '')
  if old then wsum = wsum - old end
  wsum = wsum + w
  redis.call('HSET', aw, tenant, w)
  redis.call('ZADD', act, ms, tenant)
  if wsum < w or redis.call('ZCARD', act) == 1 then wsum = w end
  redis.call('HSET', aw, '#sum', wsum)
  for _, k in ipairs({act, aw, use}) do redis.call('PEXPIRE', k, STATE_TTL_MS) end
  return wsum
end

-- The tenant's decayed request count (its rate is v * 1000 / TAU_MS).
local function up_usage(pfx, tenant, ms)
  local raw = redis.call('HGET', pfx .. 'use', tenant)
  if not raw then return 0 end
  local sep = string.find(raw, ':', 1, true)
  if not sep then return 0 end
  local v, t = tonumber(string.sub(raw, 1, sep - 1)), tonumber(string.sub(raw, sep + 1))
  if not v or not t then return 0 end
  if ms > t then v = v * math.exp((t - ms) / TAU_MS) end
  return v
end

-- Counts one request of the tenant on the upstream (direct or dispatched).
local function up_used(pfx, tenant, ms)
  local v = up_usage(pfx, tenant, ms)
  redis.call('HSET', pfx .. 'use', tenant, string.format('%.4f:%d', v + 1, ms))
  redis.call('PEXPIRE', pfx .. 'use', STATE_TTL_MS)
end

-- Queued requests: n (all), tn[tenant] (per tenant).
local function q_count(pfx, t)
  redis.call('HINCRBY', pfx .. 'tn', t, 1)
  redis.call('INCR', pfx .. 'n')
end

local function q_uncount(pfx, t)
  if redis.call('HINCRBY', pfx .. 'tn', t, -1) <= 0 then redis.call('HDEL', pfx .. 'tn', t) end
  if redis.call('DECR', pfx .. 'n') <= 0 then redis.call('DEL', pfx .. 'n') end
end

-- A tenant joins the DRR ring (at the tail) when it gets its first queued
-- request; w (hash) holds the weights of the tenants in the ring.
local function ring_join(pfx, t, weight)
  if redis.call('HSETNX', pfx .. 'w', t, weight) == 1 then
    redis.call('RPUSH', pfx .. 'ring', t)
  end
end

-- ... and leaves it, with its deficit, when its queue is empty.
local function ring_leave(pfx, t)
  if redis.call('LINDEX', pfx .. 'ring', 0) == t then
    redis.call('LPOP', pfx .. 'ring')
  else
    redis.call('LREM', pfx .. 'ring', 1, t)
  end
  redis.call('HDEL', pfx .. 'w', t)
  redis.call('HDEL', pfx .. 'drr', t)
  if redis.call('HGET', pfx .. 'drr', '#turn') == t then redis.call('HDEL', pfx .. 'drr', '#turn') end
end

-- Puts a request id back at the front of its tenant's FIFO (a requeue keeps
-- its place: it was the oldest).
local function q_push_front(pfx, t, id, weight)
  redis.call('LPUSH', pfx .. 'q:' .. t, id)
  ring_join(pfx, t, weight)
end

-- Stores a final answer in the item (status, headers JSON, body), drops the
-- request itself, keeps the result for ttl_ms and tells the waiters.
local function q_finish(key, id, state, status, hdrs, body, ttl_ms, channel, ms)
  redis.call('HSET', key, 'st', state, 'rs', status, 'rh', hdrs, 'rb', body, 'fin', ms)
  redis.call('HDEL', key, 'body', 'hdrs')
  redis.call('PEXPIRE', key, ttl_ms)
  redis.call('PUBLISH', channel, 'd:' .. id)
end

-- Gives one capacity token back (a dispatch that never reached the upstream).
local function cap_refund(pfx, rate, burst, ms)
  local tok = bucket_level(pfx .. 'cap', rate, burst, ms) + 1
  if tok > burst then tok = burst end
  bucket_set(pfx .. 'cap', tok, ms, STATE_TTL_MS)
end
"#
    };
}

/// The decision. One EVALSHA per request.
///
/// ```text
/// KEYS[1]  sluice:{t:<tenant>}:cfg
/// ARGV[1]  test clock offset in ms (integer, usually 0)
/// ARGV[2]  cost in units (1..=1e6), before the tenant's cost weight;
///          charged to tier and route windows
/// ARGV[3]  default tier name
/// ARGV[4]  tiers JSON {"<tier>":{"hour":N,...,"reserved_pool":"p"}}
/// ARGV[5]  tier counter prefix   sluice:{t:<tenant>}:q:
/// ARGV[6]  route counter prefix  sluice:{t:<tenant>}:r:<policy>: ("" if none)
/// ARGV[7]  token estimate (0 = the request counts no tokens)
/// ARGV[8]  token counter prefix  sluice:{t:<tenant>}:k:
/// ARGV[9]  reservation prefix    sluice:{t:<tenant>}:res:
/// ARGV[10] reservation sequence  sluice:{t:<tenant>}:resseq
/// ARGV[11] storage key           sluice:{t:<tenant>}:storage ("" = not an upload)
/// ARGV[12] reservation TTL in seconds
/// ARGV[13] usage rollup prefix   sluice:{t:<tenant>}:u:
/// ARGV[14] usage retention in seconds (the rollup lives this long after its day)
/// ARGV[15] 1 when the route is in shadow mode, else 0
/// ARGV[16] short-term rate bucket sluice:{t:<tenant>}:rate
/// ARGV[17] upstream prefix sluice:{u:<upstream>}: ("" = no upstream: quotas only)
/// ARGV[18] upstream "rate,burst,debt,tenant_depth,global_depth"
/// ARGV[19] tenant   ARGV[20] can_queue 0|1   ARGV[21] on_quota_exceeded 0 reject | 1 queue
/// ARGV[22] max wait ms   ARGV[23] ticket id (used only if queued)   ARGV[24] policy ("" none)
/// ARGV[25] lease units wanted on top of the cost (0 = no lease)
/// ARGV[26..] route windows as pairs: window name, limit
/// returns  {allowed 0|1, tier, reservation id ("" = none),
///           storage used, storage limit (-1 = not checked), storage exceeded 0|1,
///           n, then n times:
///           window, kind (0 tier, 1 route, 2 tokens, 3 short-term rate), limit, used,
///           remaining, reset, reset_in, exceeded 0|1, window id,
///           then shadow 0|1, reserved pool ('' for none), day id, cost charged,
///           verdict, retry_after_s (0: from the binding window),
///           lease units, lease valid ms}
///          tier windows first (hour, day, month), then route windows in
///          order, then token windows (hour, month), then (on a rate denial)
///          the `second` window.
///          verdict: allow | quota | rate | queued | capacity | queue_full | overloaded
/// ```
/// Counter, reservation and rollup keys are built from prefixes that carry
/// KEYS[1]'s hash tag, so they are in its slot even though their ids come
/// from `TIME` or the sequence. The upstream's keys (ARGV[17]) are in the
/// upstream's slot: fine on one Redis; Redis Cluster needs the upstream half
/// (the capacity step and the ticket) split into its own script, with the
/// tenant half committed after it and the capacity token refunded if the
/// tenant half then denies (docs/design.md).
///
/// Limits: an unexpired override (`o:<limit>` in cfg, its expiry compared
/// with Redis TIME + offset, so an override reverts at its expiry without any
/// job running), else a custom limit, else the tier's. The cost is
/// multiplied by the effective `cost_weight` (default 1).
///
/// Order: quotas (and storage) first; over quota is `quota`, unless the
/// route queues on quota, the filter can queue and the binding window
/// resets within the max wait (then a ticket that waits for the reset);
/// then the tier's short-term rate (`rate_per_s`, a bucket charged on
/// arrival, direct or queued); then the upstream's capacity: direct
/// admission is max-min fair and work-conserving (README, docs/design.md);
/// the rest overflows (`queued` with a ticket, or `capacity` without a
/// queue, or a bound). Shadow mode and reserved pools skip the capacity
/// step: they are never queued.
///
/// Why atomic: Redis runs a script to completion before any other command, so
/// reading every counter and bucket, deciding, and incrementing + expiring
/// all of them is one step. Two replicas can never both admit the last unit
/// or the last token (no read-then-write race: case H02), a rejected or
/// queued request increments no quota counter (a queued one is charged at
/// dispatch, by CHARGE), no counter exists without its TTL (window end + 60
/// s), a token reservation exists exactly when its tokens were counted, and
/// the day's usage rollup agrees with the decisions exactly.
///
/// Leases: when admitted directly, ARGV[25] > 0, the route has no upstream
/// (capacity is decided per request) and the tier no short-term rate, no tokens are counted and neither
/// the tenant nor the route is in shadow mode, the script also charges a
/// lease of `lease units` (a multiple of the charged cost, at most ARGV[25],
/// at most a quarter of the smallest room left in any unit window after this
/// request, so leases shrink to nothing near the limit and several Envoys
/// racing for the last units leave some for each other) in the same INCRBY.
/// Its units are spent before they exist anywhere else, so a lease can never
/// over-admit. `lease valid ms` is the time to the earliest reset of a
/// charged window (a lease is never spent in a window it was not charged
/// to). The rollup's `cost` counts the lease when granted; LEASE_RETURN
/// takes back what was not spent.
pub const CHECK: &str = concat!(
    lua_prelude!(),
    lua_upstream!(),
    r#"
local TICKET_TTL_MS = 60000
local ms = now_ms(tonumber(ARGV[1]))
local tokens = tonumber(ARGV[7])
local tiers = cjson.decode(ARGV[4])
local cfg = read_cfg(KEYS[1])
local tier, tier_def = pick_tier(cfg, tiers, ARGV[3])
local w = windows_at(ms)
local s = math.floor(ms / 1000)

local weight = effective(cfg, tier_def, 'cost_weight', ms) or 1
if weight < 1 then weight = 1 end
local cost = tonumber(ARGV[2]) * weight

local checks = {}
for _, name in ipairs(WINDOWS) do
  local limit = effective(cfg, tier_def, name, ms)
  if limit then
    table.insert(checks, {key = ARGV[5] .. name .. ':' .. w[name].id, name = name,
      kind = 0, amount = cost, limit = limit, reset = w[name].reset})
  end
end
local route_spec = {}
local want = tonumber(ARGV[25]) or 0
local i = 26
while ARGV[i] do
  local name = ARGV[i]
  table.insert(checks, {key = ARGV[6] .. name .. ':' .. w[name].id, name = name,
    kind = 1, amount = cost, limit = tonumber(ARGV[i + 1]), reset = w[name].reset})
  table.insert(route_spec, name .. '=' .. ARGV[i + 1])
  i = i + 2
end
local token_windows = {}
if tokens > 0 then
  for _, t in ipairs(TOKEN_WINDOWS) do
    local limit = effective(cfg, tier_def, t.name, ms)
    if limit then
      local c = {key = ARGV[8] .. t.window .. ':' .. w[t.window].id, name = t.window,
        kind = 2, amount = tokens, limit = limit, reset = w[t.window].reset,
        id = w[t.window].id, limit_name = t.name}
      table.insert(checks, c)
      table.insert(token_windows, c)
    end
  end
end

local allowed = 1
local storage_used, storage_limit, storage_exceeded = 0, -1, 0
local storage_quota = effective(cfg, tier_def, 'storage_bytes', ms)
if ARGV[11] ~= '' and storage_quota then
  storage_limit = storage_quota
  storage_used = tonumber(redis.call('GET', ARGV[11]) or '0') or 0
  if storage_used >= storage_limit then
    storage_exceeded = 1
    allowed = 0
  end
end
local quota_reset = 0
-- One MGET reads every counter.
if #checks > 0 then
  local keys = {}
  for n, c in ipairs(checks) do keys[n] = c.key end
  local values = redis.call('MGET', unpack(keys))
  for n, c in ipairs(checks) do
    c.used = tonumber(values[n] or '0') or 0
    c.exceeded = 0
    if c.used + c.amount > c.limit then
      c.exceeded = 1
      allowed = 0
      if c.reset > quota_reset then quota_reset = c.reset end
    end
  end
end

local shadow = 0
if cfg['shadow'] == '1' or ARGV[15] == '1' then shadow = 1 end
local pool = pick_pool(cfg, tier_def)

-- The tier's short-term rate: a bucket charged on arrival, direct or queued.
local rate = effective(cfg, tier_def, 'rate_per_s', ms)
local burst = effective(cfg, tier_def, 'burst', ms) or rate
local share_weight = effective(cfg, tier_def, 'weight', ms) or 1
if share_weight < 1 then share_weight = 1 end
local tok = nil
if rate and rate > 0 then tok = bucket_level(ARGV[16], rate, burst, ms) end
local rate_ok = tok == nil or tok >= 1

local pfx, tenant = ARGV[17], ARGV[19]
local can_queue, queue_on_quota = ARGV[20] == '1', ARGV[21] == '1'
local max_wait = tonumber(ARGV[22]) or 0
local up = {}
for v in string.gmatch(ARGV[18], '[^,]+') do table.insert(up, tonumber(v)) end
-- Shadow mode never blocks or queues; a reserved pool has its own capacity.
local capacity = pfx ~= '' and shadow == 0 and pool == ''

local verdict, retry, not_before = 'allow', 0, 0
if allowed == 0 then
  verdict = 'quota'
  if capacity and storage_exceeded == 0 and queue_on_quota and can_queue and rate_ok
      and quota_reset * 1000 - ms <= max_wait then
    -- Wait in the queue for the binding window to reset, if there is room.
    local mine = tonumber(redis.call('HGET', pfx .. 'tn', tenant) or '0') or 0
    local n = tonumber(redis.call('GET', pfx .. 'n') or '0') or 0
    if mine >= up[4] then
      verdict, retry = 'queue_full', reset_in(quota_reset, ms)
    elseif n >= up[5] then
      verdict, retry = 'overloaded', math.ceil(n / up[1])
    else
      verdict, not_before = 'overflow', quota_reset * 1000
    end
  end
elseif not rate_ok then
  verdict, retry = 'rate', math.ceil((1 - tok) / rate)
  allowed = 0
elseif capacity then
  -- Direct admission: max-min fair, work-conserving.
  local cap = bucket_level(pfx .. 'cap', up[1], up[2], ms)
  local wsum = up_touch(pfx, tenant, share_weight, ms)
  local v = up_usage(pfx, tenant, ms)
  local n = tonumber(redis.call('GET', pfx .. 'n') or '0') or 0
  local mine = tonumber(redis.call('HGET', pfx .. 'tn', tenant) or '0') or 0
  local share = up[1] * share_weight / wsum
  local direct = false
  if mine == 0 then
    if n == 0 and cap >= math.max(1, up[2] / 2) then
      -- Uncontended: anyone may use all of the capacity.
      direct = true
    elseif v * 1000 / TAU_MS <= share and cap - 1 >= -up[3] then
      -- Contended: a tenant at or under its fair share is admitted directly,
      -- borrowing down to -debt, so it never waits behind the backlog.
      direct = true
    end
  end
  if direct then
    bucket_set(pfx .. 'cap', cap - 1, ms, STATE_TTL_MS)
    up_used(pfx, tenant, ms)
  elseif mine >= up[4] then
    verdict, retry = 'queue_full', math.ceil(mine / share)
  elseif n >= up[5] then
    verdict, retry = 'overloaded', math.ceil(n / up[1])
  else
    verdict = 'overflow'
  end
  if verdict ~= 'allow' then allowed = 0 end
end
if verdict == 'overflow' then
  if can_queue then verdict = 'queued' else verdict, retry = 'capacity', 1 end
end

local rid = ''
local day_key = ARGV[13] .. w.day.id
local lease, valid_ms = 0, 0
if allowed == 1 then
  if want > 0 and #token_windows == 0 and shadow == 0 and pfx == '' and tok == nil then
    local room = want
    for _, c in ipairs(checks) do
      local left = math.floor((c.limit - c.used - c.amount) / 4)
      if left < room then room = left end
    end
    lease = math.floor(room / cost) * cost
    if lease < 0 then lease = 0 end
  end
  valid_ms = -1
  for _, c in ipairs(checks) do
    if c.kind ~= 2 then c.amount = c.amount + lease end
    c.used = redis.call('INCRBY', c.key, c.amount)
    -- Counters only grow here (a lease return never removes a key, a
    -- refund keeps it), so a result equal to the amount means this INCRBY
    -- created the key: it gets its expiry in this same step.
    if c.used == c.amount then
      redis.call('EXPIRE', c.key, c.reset - s + 60)
    end
    if c.kind ~= 2 then
      local until_reset = c.reset * 1000 - ms
      if valid_ms < 0 or until_reset < valid_ms then valid_ms = until_reset end
    end
  end
  if valid_ms < 0 then valid_ms = 0 end
  if #token_windows > 0 then
    local ttl = tonumber(ARGV[12])
    rid = tostring(redis.call('INCR', ARGV[10]))
    -- The sequence outlives every reservation it numbered.
    redis.call('EXPIRE', ARGV[10], ttl + 60)
    local fields = {'tokens', tokens, 'state', 'reserved', 'u', day_key}
    for _, c in ipairs(token_windows) do
      table.insert(fields, 'w:' .. c.name)
      table.insert(fields, c.id .. ':' .. c.reset)
    end
    redis.call('HSET', ARGV[9] .. rid, unpack(fields))
    redis.call('EXPIRE', ARGV[9] .. rid, ttl)
    redis.call('HINCRBY', day_key, 'tokens', tokens)
  end
end
if tok ~= nil and (verdict == 'allow' or verdict == 'queued') then
  bucket_set(ARGV[16], tok - 1, ms, (burst - tok + 1) * 1000 / rate + 1000)
end
if verdict == 'queued' then
  local key = pfx .. 'tk:' .. ARGV[23]
  redis.call('HSET', key, 't', tenant, 'p', ARGV[24], 'c', ARGV[2], 'k', tokens,
    'rl', table.concat(route_spec, ','), 'mw', max_wait, 'q', ARGV[21], 'w', share_weight,
    'nb', not_before, 'ts', ms)
  redis.call('PEXPIRE', key, TICKET_TTL_MS)
end

if allowed == 1 then
  redis.call('HINCRBY', day_key, 'admitted', 1)
  redis.call('HINCRBY', day_key, 'cost', cost + lease)
elseif shadow == 1 then
  redis.call('HINCRBY', day_key, 'shadow_denied', 1)
elseif verdict == 'queued' then
  redis.call('HINCRBY', day_key, 'queued', 1)
else
  redis.call('HINCRBY', day_key, 'denied', 1)
end
redis.call('EXPIRE', day_key, w.day.reset - s + tonumber(ARGV[14]))

local rows = #checks
if verdict == 'rate' then rows = rows + 1 end
local out = {allowed, tier, rid, storage_used, storage_limit, storage_exceeded, rows}
for _, c in ipairs(checks) do
  local remaining = c.limit - c.used
  if remaining < 0 then remaining = 0 end
  for _, v in ipairs({c.name, c.kind, c.limit, c.used, remaining, c.reset, reset_in(c.reset, ms),
      c.exceeded, w[c.name].id}) do
    table.insert(out, v)
  end
end
if verdict == 'rate' then
  for _, v in ipairs({'second', 3, rate, rate, 0, s + retry, retry, 1, tostring(s)}) do
    table.insert(out, v)
  end
end
for _, v in ipairs({shadow, pool, w.day.id, cost, verdict, retry, lease, valid_ms}) do
  table.insert(out, v)
end
return out
"#
);

/// A queued request's quota, charged once, right before a worker sends it.
///
/// ```text
/// KEYS[1]  sluice:{t:<tenant>}:cfg
/// KEYS[2]  sluice:{t:<tenant>}:chg:<request id>  (the charged marker)
/// ARGV[1]  test clock offset in ms
/// ARGV[2]  cost in units, before the tenant's cost weight
/// ARGV[3]  default tier name         ARGV[4] tiers JSON (as for CHECK)
/// ARGV[5]  tier counter prefix       ARGV[6] route counter prefix ("" if none)
/// ARGV[7]  route windows "hour=50,day=20" ("" if none)
/// ARGV[8]  token estimate (0: none)  ARGV[9] token counter prefix
/// ARGV[10] usage rollup prefix       ARGV[11] usage retention in seconds
/// ARGV[12] marker lifetime in ms (the request's remaining lifetime)
/// returns  {verdict allow|charged|quota, tier, n, then n rows as CHECK's
///           (9 fields), reset, day}; reset: epoch s when the exceeded
///           windows reset (0 unless quota); day: YYYYMMDD of the usage
///           rollup (for the day's usage index)
/// ```
/// The same limits as CHECK (overrides, custom limits, cost weight, route
/// and token windows). Token estimates of queued requests are charged as
/// they are: nothing reconciles them (the filter never sees the answer).
///
/// Why atomic, and why exactly once: the marker is set in the same step as
/// the increments, so a replay of the same request (a worker died after
/// charging) finds it and is not charged again (`charged`), and a denial
/// increments nothing.
pub const CHARGE: &str = concat!(
    lua_prelude!(),
    r#"
local ms = now_ms(tonumber(ARGV[1]))
local tokens = tonumber(ARGV[8]) or 0
local tiers = cjson.decode(ARGV[4])
local cfg = read_cfg(KEYS[1])
local tier, tier_def = pick_tier(cfg, tiers, ARGV[3])
local w = windows_at(ms)
local s = math.floor(ms / 1000)
local weight = effective(cfg, tier_def, 'cost_weight', ms) or 1
if weight < 1 then weight = 1 end
local cost = tonumber(ARGV[2]) * weight

local checks = {}
for _, name in ipairs(WINDOWS) do
  local limit = effective(cfg, tier_def, name, ms)
  if limit then
    table.insert(checks, {key = ARGV[5] .. name .. ':' .. w[name].id, name = name,
      kind = 0, amount = cost, limit = limit, reset = w[name].reset})
  end
end
for name, limit in string.gmatch(ARGV[7], '(%a+)=(%d+)') do
  if w[name] then
    table.insert(checks, {key = ARGV[6] .. name .. ':' .. w[name].id, name = name,
      kind = 1, amount = cost, limit = tonumber(limit), reset = w[name].reset})
  end
end
if tokens > 0 then
  for _, t in ipairs(TOKEN_WINDOWS) do
    local limit = effective(cfg, tier_def, t.name, ms)
    if limit then
      table.insert(checks, {key = ARGV[9] .. t.window .. ':' .. w[t.window].id, name = t.window,
        kind = 2, amount = tokens, limit = limit, reset = w[t.window].reset})
    end
  end
end
local verdict, reset = 'charged', 0
local charged = redis.call('EXISTS', KEYS[2]) == 1
for _, c in ipairs(checks) do
  c.used = tonumber(redis.call('GET', c.key) or '0') or 0
  c.exceeded = 0
  if not charged and c.used + c.amount > c.limit then
    c.exceeded = 1
    if c.reset > reset then reset = c.reset end
  end
end
if not charged then
  if reset == 0 then
    for _, c in ipairs(checks) do
      c.used = redis.call('INCRBY', c.key, c.amount)
      redis.call('EXPIRE', c.key, c.reset - s + 60)
    end
    redis.call('SET', KEYS[2], '1', 'PX', math.max(1, tonumber(ARGV[12])))
    local day_key = ARGV[10] .. w.day.id
    redis.call('HINCRBY', day_key, 'admitted', 1)
    redis.call('HINCRBY', day_key, 'cost', cost)
    if tokens > 0 then redis.call('HINCRBY', day_key, 'tokens', tokens) end
    redis.call('EXPIRE', day_key, w.day.reset - s + tonumber(ARGV[11]))
    verdict = 'allow'
  else
    verdict = 'quota'
  end
end
local out = {verdict, tier, #checks}
for _, c in ipairs(checks) do
  local remaining = c.limit - c.used
  if remaining < 0 then remaining = 0 end
  for _, v in ipairs({c.name, c.kind, c.limit, c.used, remaining, c.reset, reset_in(c.reset, ms),
      c.exceeded, w[c.name].id}) do
    table.insert(out, v)
  end
end
table.insert(out, reset)
table.insert(out, w.day.id)
return out
"#
);

/// Gives back what a lease did not spend, and books what it did (see [`CHECK`]).
///
/// ```text
/// KEYS[1]     the tenant's usage rollup of the grant's day: sluice:{t:<tenant>}:u:<YYYYMMDD>
/// KEYS[2..n]  the counters the lease was charged to, all of the same tenant
///             (one hash tag, one slot): sluice:{t:<tenant>}:q:<window>:<id>
///             or sluice:{t:<tenant>}:r:<policy>:<window>:<id>
/// ARGV[1]     units to give back (0..)
/// ARGV[2]     requests admitted from the lease
/// returns     units actually given back to the first counter
/// ```
/// Why atomic: every counter of the lease is lowered together, never below
/// 0, a counter whose window is over (expired) is not recreated, and the
/// rollup moves with them: `admitted` gains the lease's requests, `cost`
/// loses the units given back. A rollup that no longer exists is left alone
/// (no key without its expiry). DECRBY and HINCRBY keep a key's TTL.
pub const LEASE_RETURN: &str = r#"
local units = tonumber(ARGV[1]) or 0
local spent = tonumber(ARGV[2]) or 0
local first = 0
for n = 2, #KEYS do
  local v = tonumber(redis.call('GET', KEYS[n]) or '0') or 0
  local d = units
  if d > v then d = v end
  if d > 0 then redis.call('DECRBY', KEYS[n], d) end
  if n == 2 then first = d end
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  if spent > 0 then redis.call('HINCRBY', KEYS[1], 'admitted', spent) end
  if first > 0 then redis.call('HINCRBY', KEYS[1], 'cost', -first) end
end
return first
"#;

/// Replaces a token reservation with the real usage. One EVALSHA per report.
///
/// ```text
/// KEYS[1]  sluice:{t:<tenant>}:res:<id>
/// ARGV[1]  test clock offset in ms
/// ARGV[2]  real total tokens (0..=1e9)
/// ARGV[3]  1 if the response completed, 0 if it was cut off (then the
///          tenant is charged at least the reservation)
/// ARGV[4]  token counter prefix sluice:{t:<tenant>}:k:
/// ARGV[5]  seconds a settled reservation is kept (config::SETTLED_TTL_S)
/// returns  {status, reserved, charged}; status is 'settled' (applied now),
///          'duplicate' (settled before: nothing changes) or 'unknown'
///          (no such reservation, e.g. expired: nothing changes).
/// ```
/// Only the difference moves: `charged - reserved` is added to every token
/// window the reservation was counted in (the window ids stored in the
/// reservation, not the current ones, so an hour that rolled over while the
/// response streamed is still the one corrected), and to the `tokens` of the
/// day's usage rollup the reservation was counted in (field `u`; left alone
/// once that rollup has expired). A refund never takes a counter below 0,
/// and a window already over (reset + 60 s passed) is left alone.
///
/// Why atomic: reading the reservation's state, adjusting the counters and
/// marking it settled is one step, so two deliveries of one report can not
/// both apply (idempotent), and no check sees a half-applied correction.
pub const RECONCILE: &str = concat!(
    lua_prelude!(),
    r#"
local ms = now_ms(tonumber(ARGV[1]))
local s = math.floor(ms / 1000)
local actual = tonumber(ARGV[2])
local complete = ARGV[3] == '1'
local flat = redis.call('HGETALL', KEYS[1])
local r = {}
for j = 1, #flat, 2 do r[flat[j]] = flat[j + 1] end
if not r.tokens then return {'unknown', 0, 0} end
local reserved = tonumber(r.tokens) or 0
if r.state == 'settled' then return {'duplicate', reserved, tonumber(r.charged) or 0} end
local charge = actual
if not complete and charge < reserved then charge = reserved end
local delta = charge - reserved
for field, v in pairs(r) do
  if string.sub(field, 1, 2) == 'w:' then
    local window = string.sub(field, 3)
    local id, reset = string.match(v, '^(%d+):(%d+)$')
    reset = tonumber(reset)
    if id and reset + 60 > s then
      local key = ARGV[4] .. window .. ':' .. id
      if delta > 0 then
        redis.call('INCRBY', key, delta)
        redis.call('EXPIRE', key, reset - s + 60)
      elseif delta < 0 then
        local current = tonumber(redis.call('GET', key) or '0') or 0
        local refund = -delta
        if refund > current then refund = current end
        if refund > 0 then redis.call('DECRBY', key, refund) end
      end
    end
  end
end
-- The rollup keeps its TTL: only touched while it exists.
if r.u and delta ~= 0 and redis.call('EXISTS', r.u) == 1 then
  local current = tonumber(redis.call('HGET', r.u, 'tokens') or '0') or 0
  local change = delta
  if change < -current then change = -current end
  if change ~= 0 then redis.call('HINCRBY', r.u, 'tokens', change) end
end
redis.call('HSET', KEYS[1], 'state', 'settled', 'charged', charge)
-- Settled: only kept to answer a replay with 'duplicate' (after it, a
-- replay is 'unknown': it changes nothing either way). Never lengthened.
local ttl = tonumber(ARGV[5]) or 0
if ttl > 0 and redis.call('TTL', KEYS[1]) > ttl then redis.call('EXPIRE', KEYS[1], ttl) end
return {'settled', reserved, charge}
"#
);

/// Takes an overflowed request into the queue, consuming its ticket.
///
/// ```text
/// KEYS[1]  sluice:{u:<upstream>}:tk:<ticket>   KEYS[2]  sluice:{u:<upstream>}:it:<id>
/// ARGV[1]  upstream prefix   ARGV[2] test clock offset ms   ARGV[3] request id
/// ARGV[4]  mode wait|async   ARGV[5] method   ARGV[6] path   ARGV[7] headers JSON
/// ARGV[8]  body              ARGV[9] tenant depth bound      ARGV[10] global depth bound
/// ARGV[11] ms to keep the item after its deadline (leases + result TTL)
/// ARGV[12] tenant of the request (must be the ticket's)
/// ARGV[13] events channel    ARGV[14] work message (w:<upstream>)
/// returns  {ok, deadline_ms, now_ms} | {bad_ticket} | {queue_full, depth} | {overloaded, depth}
/// ```
/// Why atomic: the ticket is read and deleted in the step that stores the
/// request, so a ticket admits at most one request, and the bounds are
/// checked against the counts the request is added to (no overshoot). A
/// full queue refuses the newcomer; nothing queued is ever evicted.
pub const ENQUEUE: &str = concat!(
    lua_prelude!(),
    lua_upstream!(),
    r#"
local ms = now_ms(tonumber(ARGV[2]))
local pfx, id = ARGV[1], ARGV[3]
local tk = redis.call('HMGET', KEYS[1], 't', 'p', 'c', 'rl', 'mw', 'q', 'w', 'nb', 'ts', 'k')
if not tk[1] then return {'bad_ticket'} end
redis.call('DEL', KEYS[1])
local tenant = tk[1]
if tenant ~= ARGV[12] then return {'bad_ticket'} end
local mine = tonumber(redis.call('HGET', pfx .. 'tn', tenant) or '0') or 0
if mine >= tonumber(ARGV[9]) then return {'queue_full', mine} end
local n = tonumber(redis.call('GET', pfx .. 'n') or '0') or 0
if n >= tonumber(ARGV[10]) then return {'overloaded', n} end
local created = tonumber(tk[9]) or ms
local deadline = created + (tonumber(tk[5]) or 0)
local not_before = tonumber(tk[8]) or 0
redis.call('HSET', KEYS[2], 't', tenant, 'p', tk[2], 'c', tk[3], 'rl', tk[4], 'q', tk[6], 'w', tk[7], 'k', tk[10] or '0',
  'm', ARGV[4], 'method', ARGV[5], 'path', ARGV[6], 'hdrs', ARGV[7], 'body', ARGV[8],
  'ts', created, 'dl', deadline, 'at', 0)
redis.call('PEXPIRE', KEYS[2], math.max(deadline - ms, 1) + tonumber(ARGV[11]))
if not_before > ms then
  redis.call('HSET', KEYS[2], 'st', 'deferred')
  redis.call('ZADD', pfx .. 'delay', not_before, id .. ':' .. tenant)
else
  redis.call('HSET', KEYS[2], 'st', 'queued')
  redis.call('RPUSH', pfx .. 'q:' .. tenant, id)
  ring_join(pfx, tenant, tonumber(tk[7]) or 1)
end
q_count(pfx, tenant)
redis.call('PUBLISH', ARGV[13], ARGV[14])
return {'ok', deadline, ms}
"#
);

/// One scheduling step of a worker: reap, then weighted deficit round robin.
///
/// ```text
/// ARGV[1]  upstream prefix   ARGV[2] test clock offset ms
/// ARGV[3]  rate  ARGV[4] burst  ARGV[5] concurrency (0 = unlimited)
/// ARGV[6]  lease ms          ARGV[7] max attempts      ARGV[8] result TTL ms
/// ARGV[9..11]  the answer of a request that ran out of attempts (status, headers JSON, body)
/// ARGV[12..14] the answer of a request past its deadline (status, headers JSON, body)
/// ARGV[15] events channel
/// returns  {item, id, attempt, now, tenant, policy, cost, route windows, on_quota 0|1,
///           mode, method, path, headers, body, created_ms, deadline_ms, token estimate}
///          | {wait, ms} | {empty} | {busy}
/// ```
/// Steps, with bounded work per call: (1) up to 16 expired leases (a worker
/// died) go back to the front of their tenant's queue, or fail visibly
/// after `max attempts`, or expire past their deadline; (2) up to 16
/// deferred requests whose not-before has come go back to the front;
/// (3) a request is taken only if the upstream's bucket holds a whole
/// token (queue dispatches never borrow) and the concurrency limit allows;
/// (4) DRR over the ring of backlogged tenants, at most 64 visits: the
/// tenant at the head gets `weight` requests of credit when its turn
/// starts, is served while it has credit and rotates to the tail when it
/// has none; a tenant joins at the tail (so it is served within one round)
/// and leaves, with its deficit, when its queue is empty. Requests past
/// their deadline are dropped, never dispatched, their result set to the
/// timeout answer. The taken request is leased (ZSET by lease deadline).
///
/// Why atomic: taking the token, popping the request and leasing it is one
/// step, so two workers (any replicas) never take the same request or the
/// same token, and no request is ever out of both the queue and the leases.
pub const DEQUEUE: &str = concat!(
    lua_prelude!(),
    lua_upstream!(),
    r#"
local ms = now_ms(tonumber(ARGV[2]))
local pfx = ARGV[1]
local rate, burst, conc = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local lease_ms, max_attempts, ttl = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local channel = ARGV[15]

for _, id in ipairs(redis.call('ZRANGEBYSCORE', pfx .. 'lease', '-inf', ms, 'LIMIT', 0, 16)) do
  redis.call('ZREM', pfx .. 'lease', id)
  local key = pfx .. 'it:' .. id
  local it = redis.call('HMGET', key, 'st', 'at', 't', 'dl', 'w')
  if it[1] == 'leased' then
    if (tonumber(it[2]) or 0) >= max_attempts then
      q_finish(key, id, 'failed', ARGV[9], ARGV[10], ARGV[11], ttl, channel, ms)
    elseif ms > (tonumber(it[4]) or 0) then
      q_finish(key, id, 'expired', ARGV[12], ARGV[13], ARGV[14], ttl, channel, ms)
    else
      redis.call('HSET', key, 'st', 'queued')
      q_push_front(pfx, it[3], id, tonumber(it[5]) or 1)
      q_count(pfx, it[3])
    end
  end
end

-- Deferred members are "<id>:<tenant>" (ids are 32 hex digits), so a
-- request that expired from Redis while deferred is still uncounted.
local due = redis.call('ZRANGEBYSCORE', pfx .. 'delay', '-inf', ms, 'LIMIT', 0, 16)
for i = #due, 1, -1 do
  local member = due[i]
  local id, t = string.sub(member, 1, 32), string.sub(member, 34)
  redis.call('ZREM', pfx .. 'delay', member)
  local key = pfx .. 'it:' .. id
  local it = redis.call('HMGET', key, 'st', 'w')
  if it[1] == 'deferred' then
    redis.call('HSET', key, 'st', 'queued')
    q_push_front(pfx, t, id, tonumber(it[2]) or 1)
  elseif not it[1] then
    q_uncount(pfx, t)
  end
end

local tok = bucket_level(pfx .. 'cap', rate, burst, ms)
if tok < 1 then return {'wait', math.ceil((1 - tok) * 1000 / rate)} end
if conc > 0 and redis.call('ZCARD', pfx .. 'lease') >= conc then return {'wait', 20} end

local ring, drr = pfx .. 'ring', pfx .. 'drr'
for _ = 1, 64 do
  local t = redis.call('LINDEX', ring, 0)
  if not t then return {'empty'} end
  local q = pfx .. 'q:' .. t
  local id = redis.call('LINDEX', q, 0)
  if not id then
    ring_leave(pfx, t)
  else
    local key = pfx .. 'it:' .. id
    local it = redis.call('HMGET', key, 'st', 'dl')
    if it[1] ~= 'queued' then
      -- A stale id: the item expired from Redis (it was still counted) or
      -- was taken another way (then it is not counted).
      redis.call('LPOP', q)
      if not it[1] then q_uncount(pfx, t) end
      if redis.call('LLEN', q) == 0 then ring_leave(pfx, t) end
    elseif ms > (tonumber(it[2]) or 0) then
      redis.call('LPOP', q)
      q_uncount(pfx, t)
      q_finish(key, id, 'expired', ARGV[12], ARGV[13], ARGV[14], ttl, channel, ms)
      if redis.call('LLEN', q) == 0 then ring_leave(pfx, t) end
    else
      local weight = tonumber(redis.call('HGET', pfx .. 'w', t) or '1') or 1
      local deficit = tonumber(redis.call('HGET', drr, t) or '0') or 0
      if redis.call('HGET', drr, '#turn') ~= t then
        deficit = deficit + weight
        redis.call('HSET', drr, '#turn', t)
      end
      if deficit >= 1 then
        redis.call('LPOP', q)
        q_uncount(pfx, t)
        if redis.call('LLEN', q) == 0 then
          ring_leave(pfx, t)
        else
          redis.call('HSET', drr, t, deficit - 1)
        end
        bucket_set(pfx .. 'cap', tok - 1, ms, STATE_TTL_MS)
        up_touch(pfx, t, weight, ms)
        up_used(pfx, t, ms)
        local attempt = redis.call('HINCRBY', key, 'at', 1)
        redis.call('HSET', key, 'st', 'leased', 'ls', ms + lease_ms)
        redis.call('ZADD', pfx .. 'lease', ms + lease_ms, id)
        local f = redis.call('HMGET', key, 't', 'p', 'c', 'rl', 'q', 'm', 'method', 'path', 'hdrs', 'body', 'ts', 'dl', 'k')
        local out = {'item', id, attempt, ms}
        for i = 1, 13 do table.insert(out, f[i] or '') end
        return out
      else
        redis.call('HSET', drr, t, deficit)
        redis.call('HDEL', drr, '#turn')
        redis.call('LMOVE', ring, ring, 'LEFT', 'RIGHT')
      end
    end
  end
end
return {'busy'}
"#
);

/// Stores the answer of a dispatched request (or of one answered without
/// dispatch, e.g. its quota ran out) and wakes its waiter.
///
/// ```text
/// KEYS[1]  sluice:{u:<upstream>}:it:<id>
/// ARGV[1]  upstream prefix   ARGV[2] id   ARGV[3] test clock offset ms
/// ARGV[4]  status  ARGV[5] headers JSON  ARGV[6] body  ARGV[7] result TTL ms
/// ARGV[8]  events channel    ARGV[9] refund the capacity token 0|1
/// ARGV[10] rate  ARGV[11] burst
/// returns  {ok} | {stale} (already final: the first answer wins) | {gone}
/// ```
/// Why atomic: the lease is dropped and the result stored in one step; if
/// the reaper requeued the request meanwhile (a slow worker), the request
/// is taken out of the queue in the same step, so it is not sent again.
pub const COMPLETE: &str = concat!(
    lua_prelude!(),
    lua_upstream!(),
    r#"
local ms = now_ms(tonumber(ARGV[3]))
local pfx, id, key = ARGV[1], ARGV[2], KEYS[1]
local it = redis.call('HMGET', key, 'st', 't')
local st = it[1]
if not st then return {'gone'} end
if st ~= 'leased' and st ~= 'queued' and st ~= 'deferred' then return {'stale'} end
redis.call('ZREM', pfx .. 'lease', id)
if st == 'queued' then
  redis.call('LREM', pfx .. 'q:' .. it[2], 1, id)
  q_uncount(pfx, it[2])
  if redis.call('LLEN', pfx .. 'q:' .. it[2]) == 0 then ring_leave(pfx, it[2]) end
elseif st == 'deferred' then
  redis.call('ZREM', pfx .. 'delay', id .. ':' .. it[2])
  q_uncount(pfx, it[2])
end
if ARGV[9] == '1' then cap_refund(pfx, tonumber(ARGV[10]), tonumber(ARGV[11]), ms) end
q_finish(key, id, 'done', ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7]), ARGV[8], ms)
return {'ok'}
"#
);

/// A worker gives a leased request back: to the front of its tenant's queue
/// (shutdown) or deferred until a not-before time (its quota resets within
/// its max wait). The capacity token is refunded: nothing was sent.
///
/// ```text
/// KEYS[1]  sluice:{u:<upstream>}:it:<id>
/// ARGV[1]  upstream prefix   ARGV[2] id   ARGV[3] attempt   ARGV[4] test clock offset ms
/// ARGV[5]  not-before ms (0 = front of the queue now)   ARGV[6] rate   ARGV[7] burst
/// ARGV[8]  events channel    ARGV[9] work message
/// returns  {ok} | {stale}
/// ```
/// Why atomic: the lease is dropped and the request requeued in one step:
/// it is never in neither place, and never in both.
pub const GIVE_BACK: &str = concat!(
    lua_prelude!(),
    lua_upstream!(),
    r#"
local ms = now_ms(tonumber(ARGV[4]))
local pfx, id, key = ARGV[1], ARGV[2], KEYS[1]
local it = redis.call('HMGET', key, 'st', 'at', 't', 'w')
if it[1] ~= 'leased' or tonumber(it[2]) ~= tonumber(ARGV[3]) then return {'stale'} end
redis.call('ZREM', pfx .. 'lease', id)
local not_before = tonumber(ARGV[5]) or 0
if not_before > ms then
  redis.call('HSET', key, 'st', 'deferred')
  redis.call('ZADD', pfx .. 'delay', not_before, id .. ':' .. it[3])
else
  redis.call('HSET', key, 'st', 'queued')
  q_push_front(pfx, it[3], id, tonumber(it[4]) or 1)
end
q_count(pfx, it[3])
cap_refund(pfx, tonumber(ARGV[6]), tonumber(ARGV[7]), ms)
redis.call('PUBLISH', ARGV[8], ARGV[9])
return {'ok'}
"#
);

/// Takes a waiting request out of the queue: its wait-mode client gave up
/// (`gone`: the item is deleted) or its deadline passed (`timeout`: the
/// timeout answer is stored as its result, visible to async readers).
///
/// ```text
/// KEYS[1]  sluice:{u:<upstream>}:it:<id>
/// ARGV[1]  upstream prefix   ARGV[2] id   ARGV[3] test clock offset ms
/// ARGV[4]  reason timeout|gone   ARGV[5..7] timeout answer (status, headers JSON, body)
/// ARGV[8]  result TTL ms     ARGV[9] events channel
/// returns  {removed} | {<state>} (leased: being dispatched; done/expired/...: final) | {gone}
/// ```
/// Why atomic: the state is read and the request removed in one step, so a
/// worker either took it before (then it is `leased` and is not removed) or
/// never will: a timed-out request is never dispatched afterwards.
pub const CANCEL: &str = concat!(
    lua_prelude!(),
    lua_upstream!(),
    r#"
local ms = now_ms(tonumber(ARGV[3]))
local pfx, id, key = ARGV[1], ARGV[2], KEYS[1]
local it = redis.call('HMGET', key, 'st', 't')
local st = it[1]
if not st then return {'gone'} end
if st == 'queued' then
  redis.call('LREM', pfx .. 'q:' .. it[2], 1, id)
  q_uncount(pfx, it[2])
  if redis.call('LLEN', pfx .. 'q:' .. it[2]) == 0 then ring_leave(pfx, it[2]) end
elseif st == 'deferred' then
  redis.call('ZREM', pfx .. 'delay', id .. ':' .. it[2])
  q_uncount(pfx, it[2])
else
  return {st}
end
if ARGV[4] == 'timeout' then
  q_finish(key, id, 'expired', ARGV[5], ARGV[6], ARGV[7], tonumber(ARGV[8]), ARGV[9], ms)
else
  redis.call('DEL', key)
end
return {'removed'}
"#
);

/// Queue depth of an upstream, per tenant, with each tenant's oldest wait.
///
/// ```text
/// ARGV[1]  upstream prefix   ARGV[2] test clock offset ms   ARGV[3] most tenants listed
/// returns  {now_ms, queued, in_flight, deferred, tenants_total, oldest_ms (0: none),
///           listed, then listed times: tenant, depth, oldest arrival ms (0: only deferred)}
///          tenants listed deepest first.
/// ```
/// Read-only; atomic so the counts belong together. Work is bounded by the
/// number of backlogged tenants (at most the global depth bound).
pub const QUEUE_STATS: &str = concat!(
    lua_prelude!(),
    r#"
local ms = now_ms(tonumber(ARGV[2]))
local pfx, max = ARGV[1], tonumber(ARGV[3])
local flat = redis.call('HGETALL', pfx .. 'tn')
local tenants, oldest_all = {}, 0
for i = 1, #flat, 2 do
  local t = flat[i]
  local head = redis.call('LINDEX', pfx .. 'q:' .. t, 0)
  local oldest = 0
  if head then oldest = tonumber(redis.call('HGET', pfx .. 'it:' .. head, 'ts') or '0') or 0 end
  if oldest > 0 and (oldest_all == 0 or oldest < oldest_all) then oldest_all = oldest end
  table.insert(tenants, {t, tonumber(flat[i + 1]) or 0, oldest})
end
table.sort(tenants, function(a, b) if a[2] ~= b[2] then return a[2] > b[2] end return a[1] < b[1] end)
local listed = math.min(#tenants, max)
local out = {ms, tonumber(redis.call('GET', pfx .. 'n') or '0') or 0, redis.call('ZCARD', pfx .. 'lease'),
  redis.call('ZCARD', pfx .. 'delay'), #tenants, oldest_all, listed}
for i = 1, listed do
  for _, v in ipairs(tenants[i]) do table.insert(out, v) end
end
return out
"#
);

/// Read-only view of a tenant for the admin API (never writes).
///
/// ```text
/// KEYS[1]  sluice:{t:<tenant>}:cfg
/// ARGV[1]  test clock offset in ms
/// ARGV[2]  default tier name
/// ARGV[3]  tiers JSON (as for CHECK)
/// ARGV[4]  tier counter prefix  sluice:{t:<tenant>}:q:
/// ARGV[5]  token counter prefix sluice:{t:<tenant>}:k:
/// ARGV[6]  storage key          sluice:{t:<tenant>}:storage
/// ARGV[7..] limit names (config::LIMITS)
/// returns  {tier, stored tier ('' if none), shadow 0|1, reserved pool,
///           storage used, n, then n times:
///           name, effective (-1 = not enforced), source (tier|custom|override|none),
///           override until ms (0), tier value (-1), custom value (-1),
///           override value (-1; only an unexpired one), current (-1 unless a
///           counted window: hour, day, month, tokens_hour, tokens_month),
///           reset (0), reset_in (0)}
/// ```
/// Why atomic: the cfg and all counters are read at one instant, so the
/// limits and usage shown belong together.
pub const STATUS: &str = concat!(
    lua_prelude!(),
    r#"
local ms = now_ms(tonumber(ARGV[1]))
local tiers = cjson.decode(ARGV[3])
local cfg = read_cfg(KEYS[1])
local tier, tier_def = pick_tier(cfg, tiers, ARGV[2])
local w = windows_at(ms)
local token_window = {}
for _, t in ipairs(TOKEN_WINDOWS) do token_window[t.name] = t.window end
local shadow = 0
if cfg['shadow'] == '1' then shadow = 1 end
local storage_used = tonumber(redis.call('GET', ARGV[6]) or '0') or 0
local out = {tier, cfg['tier'] or '', shadow, pick_pool(cfg, tier_def), storage_used, 0}
local n = 0
local i = 7
while ARGV[i] do
  local name = ARGV[i]
  local eff, source, until_ms = effective(cfg, tier_def, name, ms)
  local tv = tier_def[name]
  if type(tv) ~= 'number' then tv = -1 end
  local cv = tonumber(cfg[name] or '') or -1
  local ov = active_override(cfg, name, ms) or -1
  local current, reset, rin = -1, 0, 0
  local key, win = nil, nil
  if w[name] then
    key, win = ARGV[4] .. name .. ':' .. w[name].id, name
  elseif token_window[name] then
    win = token_window[name]
    key = ARGV[5] .. win .. ':' .. w[win].id
  end
  if key and eff then
    current = tonumber(redis.call('GET', key) or '0') or 0
    reset, rin = w[win].reset, reset_in(w[win].reset, ms)
  end
  for _, v in ipairs({name, eff or -1, source, until_ms, tv, cv, ov, current, reset, rin}) do
    table.insert(out, v)
  end
  n = n + 1
  i = i + 1
end
out[6] = n
return out
"#
);

/// Applies an admin change to a tenant's cfg hash, after dropping overrides
/// that have expired (the lazy clean-up: nothing has to run at the expiry,
/// decisions already ignore them).
///
/// ```text
/// KEYS[1]  sluice:{t:<tenant>}:cfg
/// ARGV[1]  test clock offset in ms
/// ARGV[2..] pairs: field, value ('' deletes the field)
/// returns  number of fields the hash has afterwards
/// ```
/// Why atomic: a check never sees half of a change.
pub const TENANT_UPDATE: &str = concat!(
    lua_prelude!(),
    r#"
local ms = now_ms(tonumber(ARGV[1]))
local cfg = read_cfg(KEYS[1])
for field, value in pairs(cfg) do
  if string.sub(field, 1, 2) == 'o:' then
    local _, u = string.match(value, '^(%d+):(%d+)$')
    if not u or tonumber(u) <= ms then redis.call('HDEL', KEYS[1], field) end
  end
end
local i = 2
while ARGV[i] do
  if ARGV[i + 1] == '' then
    redis.call('HDEL', KEYS[1], ARGV[i])
  else
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
  i = i + 2
end
return redis.call('HLEN', KEYS[1])
"#
);

/// Adds an upstream latency report to the tenant's daily rollup.
///
/// ```text
/// KEYS[1]  sluice:{t:<tenant>}:cfg (the slot anchor; not read)
/// ARGV[1]  test clock offset in ms
/// ARGV[2]  usage rollup prefix sluice:{t:<tenant>}:u:
/// ARGV[3]  usage retention in seconds
/// ARGV[4]  latency histogram bucket index (metrics::LATENCY_BUCKETS_MS)
/// ARGV[5]  latency in ms
/// returns  the day id
/// ```
/// Why atomic: count, sum and bucket move together, so mean and p95 always
/// describe the same set of reports.
pub const REPORT: &str = concat!(
    lua_prelude!(),
    r#"
local ms = now_ms(tonumber(ARGV[1]))
local w = windows_at(ms)
local key = ARGV[2] .. w.day.id
redis.call('HINCRBY', key, 'lat_n', 1)
redis.call('HINCRBY', key, 'lat_sum_ms', ARGV[5])
redis.call('HINCRBY', key, 'lat_b' .. ARGV[4], 1)
redis.call('EXPIRE', key, w.day.reset - math.floor(ms / 1000) + tonumber(ARGV[3]))
return w.day.id
"#
);

/// Appends one audit entry (the write-ahead entry of a tenant change).
///
/// ```text
/// KEYS[1]  sluice:{g}:audit
/// ARGV[1]  test clock offset in ms
/// ARGV[2]  retention in ms
/// ARGV[3..] field/value pairs of the entry
/// returns  the entry id
/// ```
pub const AUDIT_APPEND: &str = concat!(
    lua_prelude!(),
    lua_audit!(),
    r#"
local ms = now_ms(tonumber(ARGV[1]))
return audit_add(KEYS[1], ms, tonumber(ARGV[2]), 3)
"#
);

/// Seeds the tiers when Redis has none, and returns what Redis has.
///
/// ```text
/// KEYS[1]  sluice:{g}:tiers   KEYS[2]  sluice:{g}:audit
/// ARGV[1]  the seed document (JSON)
/// ARGV[2]  test clock offset in ms   ARGV[3]  audit retention in ms
/// ARGV[4..] field/value pairs of the audit entry written when seeding
/// returns  {seeded 0|1, document, version}
/// ```
/// Why atomic: two replicas starting at once can not both seed (the second
/// sees the first's document), and the seed has its audit entry.
pub const TIERS_SEED: &str = concat!(
    lua_prelude!(),
    lua_audit!(),
    r#"
local doc = redis.call('HGET', KEYS[1], 'doc')
if doc then
  return {0, doc, tonumber(redis.call('HGET', KEYS[1], 'version') or '0') or 0}
end
-- The entry first: if it can not be written the script stops before any
-- change (Redis does not roll back a script's earlier writes).
audit_add(KEYS[2], now_ms(tonumber(ARGV[2])), tonumber(ARGV[3]), 4)
redis.call('HSET', KEYS[1], 'doc', ARGV[1], 'version', 1)
return {1, ARGV[1], 1}
"#
);

/// Replaces the tiers document if nobody changed it since it was read
/// (compare-and-set on the version), with its audit entry.
///
/// ```text
/// KEYS[1]  sluice:{g}:tiers   KEYS[2]  sluice:{g}:audit
/// ARGV[1]  the version the change was computed from
/// ARGV[2]  the new document (JSON, validated by the service)
/// ARGV[3]  test clock offset in ms   ARGV[4]  audit retention in ms
/// ARGV[5..] field/value pairs of the audit entry
/// returns  {1, new version, audit id} or {0, current version} on a conflict
/// ```
/// Why atomic: the document, its version and the audit entry change in one
/// step (one slot, `{g}`), so no tiers change exists without its entry and
/// two concurrent edits can not overwrite each other unnoticed. The entry is
/// written first because Redis does not undo a failing script's earlier
/// writes: an entry that can not be written stops the script unchanged.
pub const TIERS_WRITE: &str = concat!(
    lua_prelude!(),
    lua_audit!(),
    r#"
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '0') or 0
if current ~= tonumber(ARGV[1]) then return {0, current} end
-- The entry first: if it can not be written the script stops before any
-- change (Redis does not roll back a script's earlier writes).
local id = audit_add(KEYS[2], now_ms(tonumber(ARGV[3])), tonumber(ARGV[4]), 5)
redis.call('HSET', KEYS[1], 'doc', ARGV[2])
local v = redis.call('HINCRBY', KEYS[1], 'version', 1)
return {1, v, id}
"#
);

/// Window ids and resets at a given instant, for tests of the calendar
/// arithmetic against Redis itself (not used by the service).
///
/// ```text
/// ARGV[1]  test clock offset in ms
/// returns  {hour_id, hour_reset, day_id, day_reset, month_id, month_reset, now_ms}
/// ```
pub const WINDOWS_PROBE: &str = concat!(
    lua_prelude!(),
    r#"
local ms = now_ms(tonumber(ARGV[1]))
local w = windows_at(ms)
return {w.hour.id, w.hour.reset, w.day.id, w.day.reset, w.month.id, w.month.reset, ms}
"#
);
