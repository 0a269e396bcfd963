local h = redis.call('HMGET', KEYS[1], 'state', 'fp', 'token', 'result')
if h[1] then
  if h[2] ~= ARGV[1] then return {'mismatch'} end
  if h[1] == 'done' then return {'replay', h[4]} end
  if h[3] == ARGV[2] then return {'started'} end
  return {'in_progress', redis.call('PTTL', KEYS[1])}
end
redis.call('HSET', KEYS[1], 'state', 'claim', 'fp', ARGV[1], 'token', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {'started'}
