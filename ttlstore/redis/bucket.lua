local B, M = 1000000000, 1000000
local function add(a, b, sh, sl)
  local rh, rl = a[3] + b[3], a[4] + b[4]
  if rl >= B then rh, rl = rh + 1, rl - B end
  local ns = a[2] + b[2]
  if rh > sh or (rh == sh and rl >= sl) then
    rh, rl, ns = rh - sh, rl - sl, ns + 1
    if rl < 0 then rh, rl = rh - 1, rl + B end
  end
  local ms = a[1] + b[1]
  if ns >= M then ms, ns = ms + 1, ns - M end
  return {ms, ns, rh, rl}
end
local function less(a, b)
  for j = 1, 4 do
    if a[j] ~= b[j] then return a[j] < b[j] end
  end
  return false
end
-- Redis 5 and 6 may replicate scripts verbatim, which forbids a write after TIME.
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = {tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000),
             (tonumber(t[2]) % 1000) * 1000, 0, 0}
local n = (#ARGV - 1) / 2
local fields, writes = {}, {}
for i = 1, n do fields[i] = ARGV[2 * i] end
local stored = redis.call('HMGET', KEYS[1], unpack(fields))
local reply = {0, t[1], t[2]}
local allowed, full = true, 0
for i = 1, n do
  local v = {}
  for x in string.gmatch(ARGV[2 * i + 1], '%d+') do v[#v + 1] = tonumber(x) end
  local sh, sl = v[1], v[2]
  local tat = now
  local s = stored[i]
  reply[3 + i] = s
  if s then
    local ns, r = string.match(s, '^(%d+):(%d+)$')
    local old = {tonumber(string.sub(ns, 1, -7)) or 0, tonumber(string.sub(ns, -6)),
                 tonumber(string.sub(r, 1, -10)) or 0, tonumber(string.sub(r, -9))}
    if less(now, old) then tat = old end
  end
  local new = add(tat, {v[7], v[8], v[9], v[10]}, sh, sl)
  if less(add(now, {v[3], v[4], v[5], v[6]}, sh, sl), new) then allowed = false end
  local at = new[1]
  if new[2] > 0 or new[3] > 0 or new[4] > 0 then at = at + 1 end
  if at > full then full = at end
  local rest = string.format('%.0f', new[4])
  if new[3] > 0 then rest = string.format('%.0f%09.0f', new[3], new[4]) end
  writes[2 * i - 1] = fields[i]
  writes[2 * i] = string.format('%.0f%06.0f:', new[1], new[2]) .. rest
end
if allowed then
  reply[1] = 1
  if ARGV[1] == '1' then
    redis.call('HSET', KEYS[1], unpack(writes))
    redis.call('PEXPIREAT', KEYS[1], string.format('%.0f', full))
  end
end
return reply
