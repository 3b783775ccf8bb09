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
/// ARGV[16..] route windows as pairs: window name, limit
/// returns  {allowed 0|1, tier, reservation id ("" = none),
///           storage used, storage limit (-1 = not checked), storage exceeded 0|1,
///           n, then n times:
///           window, kind (0 tier, 1 route, 2 tokens), limit, used, remaining,
///           reset, reset_in, exceeded 0|1,
///           then shadow 0|1, reserved pool ('' for none), day id, cost charged}
///          tier windows first (hour, day, month), then route windows in
///          order, then token windows (hour, month).
/// ```
/// Counter, reservation and rollup keys are built from prefixes that carry
/// KEYS[1]'s hash tag, so they are in its slot even though their ids come
/// from `TIME` or the sequence.
///
/// Limits: an unexpired override (`o:<limit>` in cfg, its expiry compared
/// with Redis TIME + offset, so an override reverts at its expiry without any
/// job running), else a custom limit, else the tier's. The cost is
/// multiplied by the effective `cost_weight` (default 1).
///
/// Why atomic: Redis runs a script to completion before any other command, so
/// reading every counter, deciding, and incrementing + expiring all of them
/// is one step. Two replicas can never both admit the last unit or the last
/// token (no read-then-write race: case H02), a rejected request increments
/// nothing, no counter exists without its TTL (window end + 60 s), a token
/// reservation exists exactly when its tokens were counted, and the day's
/// usage rollup agrees with the decisions exactly.
pub const CHECK: &str = concat!(
    lua_prelude!(),
    r#"
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
local i = 16
while ARGV[i] do
  local name = ARGV[i]
  table.insert(checks, {key = ARGV[6] .. name .. ':' .. w[name].id, name = name,
    kind = 1, amount = cost, limit = tonumber(ARGV[i + 1]), reset = w[name].reset})
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
for _, c in ipairs(checks) do
  c.used = tonumber(redis.call('GET', c.key) or '0') or 0
  c.exceeded = 0
  if c.used + c.amount > c.limit then
    c.exceeded = 1
    allowed = 0
  end
end
local rid = ''
local day_key = ARGV[13] .. w.day.id
if allowed == 1 then
  for _, c in ipairs(checks) do
    c.used = redis.call('INCRBY', c.key, c.amount)
    redis.call('EXPIRE', c.key, c.reset - s + 60)
  end
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

local shadow = 0
if cfg['shadow'] == '1' or ARGV[15] == '1' then shadow = 1 end
if allowed == 1 then
  redis.call('HINCRBY', day_key, 'admitted', 1)
  redis.call('HINCRBY', day_key, 'cost', cost)
elseif shadow == 1 then
  redis.call('HINCRBY', day_key, 'shadow_denied', 1)
else
  redis.call('HINCRBY', day_key, 'denied', 1)
end
redis.call('EXPIRE', day_key, w.day.reset - s + tonumber(ARGV[14]))

local out = {allowed, tier, rid, storage_used, storage_limit, storage_exceeded, #checks}
for _, c in ipairs(checks) do
  local remaining = c.limit - c.used
  if remaining < 0 then remaining = 0 end
  for _, v in ipairs({c.name, c.kind, c.limit, c.used, remaining, c.reset, reset_in(c.reset, ms),
      c.exceeded}) do
    table.insert(out, v)
  end
end
for _, v in ipairs({shadow, pick_pool(cfg, tier_def), w.day.id, cost}) do
  table.insert(out, v)
end
return out
"#
);

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
