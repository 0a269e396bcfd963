local h = redis.call('HMGET', KEYS[1], 'state', 'token')
if h[1] ~= 'claim' or h[2] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
