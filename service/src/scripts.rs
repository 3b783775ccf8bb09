//! Every Lua script Sluice runs in Redis, in this one file.
//!
//! Every script starts with the same helper text ([`lua_prelude!`]), so the
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

-- Every limit, in the order of the tiers table and of config::LimitField.
local LIMITS = {'hour', 'day', 'month', 'tokens_hour', 'tokens_month', 'storage_bytes'}
-- Token windows: name, calendar window, index into LIMITS.
local TOKEN_WINDOWS = {{name = 'tokens_hour', window = 'hour', idx = 4},
  {name = 'tokens_month', window = 'month', idx = 5}}

-- The tenant's effective tier and limits (-1 = not enforced), LIMITS order.
-- A custom limit in the cfg hash overrides the tier for its field; a tier
-- name the config no longer knows falls back to the default tier.
local function resolve_limits(cfg_key, tiers_json, default_tier)
  local cfg = redis.call('HMGET', cfg_key, 'tier', unpack(LIMITS))
  local tiers = cjson.decode(tiers_json)
  local tier = cfg[1]
  if not tier or tiers[tier] == nil then tier = default_tier end
  local tier_limits = tiers[tier]
  local limits, custom = {}, {}
  for i = 1, #LIMITS do
    local c = -1
    if cfg[i + 1] then c = tonumber(cfg[i + 1]) or -1 end
    custom[i] = c
    if c >= 0 then limits[i] = c else limits[i] = tier_limits[i] or -1 end
  end
  return tier, limits, custom
end
"#
    };
}

/// The decision. One EVALSHA per request.
///
/// ```text
/// KEYS[1]  sluice:{t:<tenant>}:cfg
/// ARGV[1]  test clock offset in ms (integer, usually 0)
/// ARGV[2]  cost in units (1..=1e6), charged to tier and route windows
/// ARGV[3]  default tier name
/// ARGV[4]  tiers JSON {"<tier>":[hour,day,month,tokens_hour,tokens_month,storage_bytes]}
///          (-1 = not enforced)
/// ARGV[5]  tier counter prefix   sluice:{t:<tenant>}:q:
/// ARGV[6]  route counter prefix  sluice:{t:<tenant>}:r:<policy>: ("" if none)
/// ARGV[7]  token estimate (0 = the request counts no tokens)
/// ARGV[8]  token counter prefix  sluice:{t:<tenant>}:k:
/// ARGV[9]  reservation prefix    sluice:{t:<tenant>}:res:
/// ARGV[10] reservation sequence  sluice:{t:<tenant>}:resseq
/// ARGV[11] storage key           sluice:{t:<tenant>}:storage ("" = not an upload)
/// ARGV[12] reservation TTL in seconds
/// ARGV[13..] route windows as pairs: window name, limit
/// returns  {allowed 0|1, tier, reservation id ("" = none),
///           storage used, storage limit (-1 = not checked), storage exceeded 0|1,
///           n, then n times:
///           window, kind (0 tier, 1 route, 2 tokens), limit, used, remaining,
///           reset, reset_in, exceeded 0|1}
///          tier windows first (hour, day, month), then route windows in
///          order, then token windows (hour, month).
/// ```
/// Counter and reservation keys are built from prefixes that carry KEYS[1]'s
/// hash tag, so they are in its slot even though their ids come from `TIME`
/// or the sequence.
///
/// Why atomic: Redis runs a script to completion before any other command, so
/// reading every counter, deciding, and incrementing + expiring all of them
/// is one step. Two replicas can never both admit the last unit or the last
/// token (no read-then-write race: case H02), a rejected request increments
/// nothing, no counter exists without its TTL (window end + 60 s), and a
/// token reservation exists exactly when its tokens were counted.
pub const CHECK: &str = concat!(
    lua_prelude!(),
    r#"
local ms = now_ms(tonumber(ARGV[1]))
local cost = tonumber(ARGV[2])
local tokens = tonumber(ARGV[7])
local tier, limits = resolve_limits(KEYS[1], ARGV[4], ARGV[3])
local w = windows_at(ms)
local s = math.floor(ms / 1000)

local checks = {}
for i, name in ipairs(WINDOWS) do
  if limits[i] >= 0 then
    table.insert(checks, {key = ARGV[5] .. name .. ':' .. w[name].id, name = name,
      kind = 0, amount = cost, limit = limits[i], reset = w[name].reset})
  end
end
local i = 13
while ARGV[i] do
  local name = ARGV[i]
  table.insert(checks, {key = ARGV[6] .. name .. ':' .. w[name].id, name = name,
    kind = 1, amount = cost, limit = tonumber(ARGV[i + 1]), reset = w[name].reset})
  i = i + 2
end
local token_windows = {}
if tokens > 0 then
  for _, t in ipairs(TOKEN_WINDOWS) do
    if limits[t.idx] >= 0 then
      local c = {key = ARGV[8] .. t.window .. ':' .. w[t.window].id, name = t.window,
        kind = 2, amount = tokens, limit = limits[t.idx], reset = w[t.window].reset,
        id = w[t.window].id}
      table.insert(checks, c)
      table.insert(token_windows, c)
    end
  end
end

local allowed = 1
local storage_used, storage_limit, storage_exceeded = 0, -1, 0
if ARGV[11] ~= '' and limits[6] >= 0 then
  storage_limit = limits[6]
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
    local fields = {'tokens', tokens, 'state', 'reserved'}
    for _, c in ipairs(token_windows) do
      table.insert(fields, 'w:' .. c.name)
      table.insert(fields, c.id .. ':' .. c.reset)
    end
    redis.call('HSET', ARGV[9] .. rid, unpack(fields))
    redis.call('EXPIRE', ARGV[9] .. rid, ttl)
  end
end

local out = {allowed, tier, rid, storage_used, storage_limit, storage_exceeded, #checks}
for _, c in ipairs(checks) do
  local remaining = c.limit - c.used
  if remaining < 0 then remaining = 0 end
  for _, v in ipairs({c.name, c.kind, c.limit, c.used, remaining, c.reset, reset_in(c.reset, ms),
      c.exceeded}) do
    table.insert(out, v)
  end
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
/// returns  {status, reserved, charged}; status is 'settled' (applied now),
///          'duplicate' (settled before: nothing changes) or 'unknown'
///          (no such reservation, e.g. expired: nothing changes).
/// ```
/// Only the difference moves: `charged - reserved` is added to every token
/// window the reservation was counted in (the window ids stored in the
/// reservation, not the current ones, so an hour that rolled over while the
/// response streamed is still the one corrected). A refund never takes a
/// counter below 0, and a window already over (reset + 60 s passed) is left
/// alone.
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
redis.call('HSET', KEYS[1], 'state', 'settled', 'charged', charge)
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
/// returns  {tier, 6 custom limits (LIMITS order, -1 = none), storage used,
///           storage limit (-1 = none), n,
///           then n times: name, window, limit, current, reset, reset_in}
///          for every enforced tier window (hour, day, month), then every
///          enforced token window (tokens_hour, tokens_month).
/// ```
/// Why atomic: the cfg and all counters are read at one instant, so the
/// limits and usage shown belong together.
pub const STATUS: &str = concat!(
    lua_prelude!(),
    r#"
local ms = now_ms(tonumber(ARGV[1]))
local tier, limits, custom = resolve_limits(KEYS[1], ARGV[3], ARGV[2])
local w = windows_at(ms)
local rows = {}
local function row(name, window, limit, key)
  local current = tonumber(redis.call('GET', key) or '0') or 0
  for _, v in ipairs({name, window, limit, current, w[window].reset, reset_in(w[window].reset, ms)}) do
    table.insert(rows, v)
  end
end
for i, name in ipairs(WINDOWS) do
  if limits[i] >= 0 then row(name, name, limits[i], ARGV[4] .. name .. ':' .. w[name].id) end
end
for _, t in ipairs(TOKEN_WINDOWS) do
  if limits[t.idx] >= 0 then
    row(t.name, t.window, limits[t.idx], ARGV[5] .. t.window .. ':' .. w[t.window].id)
  end
end
local storage_used = tonumber(redis.call('GET', ARGV[6]) or '0') or 0
local out = {tier}
for i = 1, #LIMITS do table.insert(out, custom[i]) end
table.insert(out, storage_used)
table.insert(out, limits[6])
table.insert(out, #rows / 6)
for _, v in ipairs(rows) do table.insert(out, v) end
return out
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
