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

-- The tenant's effective tier and per-window limits (-1 = not enforced).
-- A custom limit in the cfg hash overrides the tier for its window; a tier
-- name the config no longer knows falls back to the default tier.
local function resolve_limits(cfg_key, tiers_json, default_tier)
  local cfg = redis.call('HMGET', cfg_key, 'tier', 'hour', 'day', 'month')
  local tiers = cjson.decode(tiers_json)
  local tier = cfg[1]
  if not tier or tiers[tier] == nil then tier = default_tier end
  local tier_limits = tiers[tier]
  local limits, custom = {}, {}
  for i = 1, 3 do
    local c = -1
    if cfg[i + 1] then c = tonumber(cfg[i + 1]) or -1 end
    custom[i] = c
    if c >= 0 then limits[i] = c else limits[i] = tier_limits[i] end
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
/// ARGV[2]  cost (1..=1e6)
/// ARGV[3]  default tier name
/// ARGV[4]  tiers JSON {"<tier>":[hour,day,month]} (-1 = window not enforced)
/// ARGV[5]  tier counter prefix  sluice:{t:<tenant>}:q:
/// ARGV[6]  route counter prefix sluice:{t:<tenant>}:r:<policy>: ("" if none)
/// ARGV[7.. ] route windows as pairs: window name, limit
/// returns  {allowed 0|1, tier, n, then n times:
///           window, is_route 0|1, limit, used, remaining, reset, reset_in}
///          tier windows first (hour, day, month), then route windows in order.
/// ```
/// Counter keys are `<prefix><window>:<window-id>`; they share KEYS[1]'s hash
/// tag, so they are in its slot even though their ids come from `TIME`.
///
/// Why atomic: Redis runs a script to completion before any other command, so
/// reading every counter, deciding, and incrementing + expiring all of them
/// is one step. Two replicas can never both admit the last unit (no
/// read-then-write race), a rejected request increments nothing, and no
/// counter exists without its TTL (window end + 60 s).
pub const CHECK: &str = concat!(
    lua_prelude!(),
    r#"
local ms = now_ms(tonumber(ARGV[1]))
local cost = tonumber(ARGV[2])
local tier, limits = resolve_limits(KEYS[1], ARGV[4], ARGV[3])
local w = windows_at(ms)
local s = math.floor(ms / 1000)

local checks = {}
for i, name in ipairs(WINDOWS) do
  if limits[i] >= 0 then
    table.insert(checks, {key = ARGV[5] .. name .. ':' .. w[name].id, name = name,
      route = 0, limit = limits[i], reset = w[name].reset})
  end
end
local i = 7
while ARGV[i] do
  local name = ARGV[i]
  table.insert(checks, {key = ARGV[6] .. name .. ':' .. w[name].id, name = name,
    route = 1, limit = tonumber(ARGV[i + 1]), reset = w[name].reset})
  i = i + 2
end

local allowed = 1
for _, c in ipairs(checks) do
  c.used = tonumber(redis.call('GET', c.key) or '0') or 0
  if c.used + cost > c.limit then allowed = 0 end
end
if allowed == 1 then
  for _, c in ipairs(checks) do
    c.used = redis.call('INCRBY', c.key, cost)
    redis.call('EXPIRE', c.key, c.reset - s + 60)
  end
end

local out = {allowed, tier, #checks}
for _, c in ipairs(checks) do
  local remaining = c.limit - c.used
  if remaining < 0 then remaining = 0 end
  for _, v in ipairs({c.name, c.route, c.limit, c.used, remaining, c.reset, reset_in(c.reset, ms)}) do
    table.insert(out, v)
  end
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
/// ARGV[4]  tier counter prefix sluice:{t:<tenant>}:q:
/// returns  {tier, custom_hour, custom_day, custom_month (-1 = none), n,
///           then n times: window, limit, current, reset, reset_in}
///          for every enforced tier window (hour, day, month order).
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
for i, name in ipairs(WINDOWS) do
  if limits[i] >= 0 then
    local current = tonumber(redis.call('GET', ARGV[4] .. name .. ':' .. w[name].id) or '0') or 0
    for _, v in ipairs({name, limits[i], current, w[name].reset, reset_in(w[name].reset, ms)}) do
      table.insert(rows, v)
    end
  end
end
local out = {tier, custom[1], custom[2], custom[3], #rows / 5}
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
