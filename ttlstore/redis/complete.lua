local h = redis.call('HMGET', KEYS[1], 'state', 'token', 'nonce')
if h[2] ~= ARGV[1] then return 0 end
if h[1] == 'done' then
  if h[3] == ARGV[2] then return 1 end
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'done', 'nonce', ARGV[2], 'result', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
