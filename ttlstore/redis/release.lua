local h = redis.call('HMGET', KEYS[1], 'state', 'token')
if not h[1] then return 0 end
if h[1] ~= 'claim' or h[2] ~= ARGV[1] then return -1 end
redis.call('DEL', KEYS[1])
return 1
