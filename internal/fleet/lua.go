package fleet

import (
	"context"
	"crypto/sha1"
	"encoding/hex"
	"strings"

	"github.com/redis/rueidis"
)

// The fleet's Lua scripts, all of them, each loaded as a rueidis.Lua
// (EVALSHA, and EVAL once when Redis does not know it), as go-redis/
// redis_rate keeps its scripts in one lua.go. A script that shares a
// round trip with other commands goes in the pipeline as EVALSHA (run)
// and, answered NOSCRIPT (a Redis that restarted or flushed its scripts:
// it did not run), is sent again by Exec (again). Open loads every
// script on every node when the client connects.

// takeClaim gives claim KEYS[1] to token ARGV[2] for ARGV[3] ms if it is
// still held by ARGV[1] (whose replica is gone) or by nobody.
var takeClaim = newScript(`
local h = redis.call('GET', KEYS[1])
if h and h ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1`)

// unclaim deletes a claim only if it still holds the token that took it.
var unclaim = newScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0`)

// shareClaim sets entry KEYS[1] to ARGV[1] for ARGV[2] ms and deletes its
// claim KEYS[2] (in the same hash slot) if it still holds token ARGV[3]:
// a fill's share and release, one command.
var shareClaim = newScript(`
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
return 1`)

// raiseMark sets a scope's mark to an epoch unless it already holds a later
// one (two writers' marks may land in either order). One key per call, so
// that a Redis Cluster can run it wherever the key lives.
var raiseMark = newScript(`
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if cur < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) end
return 1`)

// getOrClaim reads an entry (KEYS[1]) and its time left and, if there is
// none or ARGV[3] is "1" (the caller cannot use the one there is), takes
// the entry's claim (KEYS[2], in the same hash slot) with token ARGV[1]
// for ARGV[2] ms if it is free; it returns the claim's holder too.
var getOrClaim = newScript(`
local v = redis.call('GET', KEYS[1])
local left = redis.call('PTTL', KEYS[1])
if (not v or ARGV[3] == '1') then redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) end
return {v, left, redis.call('GET', KEYS[2])}`)

// announcePeer records a subscribed replica (ARGV[1] == "1") under each
// of its secrets' ids (ARGV[2], …) and returns the replicas announced in
// the last three seconds.
var announcePeer = newScript(`
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
for i = 2, #ARGV do
  if ARGV[1] == '1' then redis.call('ZADD', KEYS[1], now, ARGV[i]) else redis.call('ZREM', KEYS[1], ARGV[i]) end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 3000)
redis.call('PEXPIRE', KEYS[1], 10000)
return redis.call('ZRANGE', KEYS[1], 0, -1)`)

// takeSlot takes one of an account's slots (KEYS[1]) until it is given
// back or lapses, if fewer than ARGV[1] are held and, with a rate (ARGV[4]
// > 0), fewer than ARGV[4] places of the rate window (KEYS[2]) are held:
// a call holds one until it ends and for a second after (scored by when
// its call ended, or, while it lasts, by when its slot would lapse, renewed
// with it: docs/budget.md, "The rate window"). Both on Redis's clock. It returns
// {1, held} when taken; {0, held} when the slots are full, having queued
// the call in KEYS[3] (KEYS[4] holding what it waits with) for ARGV[5] ms
// (if > 0) in priority ARGV[7] to be handed a slot on channel ARGV[6]; and {-ms, held} when only the rate
// window is full: how long until it opens.
var takeSlot = newScript(`
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
if held >= tonumber(ARGV[1]) then
  local wait = tonumber(ARGV[5])
  if wait > 0 then
    redis.call('ZADD', KEYS[3], tonumber(ARGV[7]) * 1e13 + now, ARGV[3])
    redis.call('HSET', KEYS[4], ARGV[3], ARGV[1] .. ' ' .. (now + wait) .. ' ' .. ARGV[6])
    local life = wait + tonumber(ARGV[2])
    if redis.call('PTTL', KEYS[3]) < life then redis.call('PEXPIRE', KEYS[3], life) redis.call('PEXPIRE', KEYS[4], life) end
  end
  return {0, held}
end
local rate = tonumber(ARGV[4])
if rate > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 1000)
  if redis.call('ZCARD', KEYS[2]) >= rate then
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    return {-math.max(1, tonumber(oldest[2]) + 1000 - now), held}
  end
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[3])
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[2]) + 2000)
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1, held + 1}`)

// giveSlot gives slot ARGV[1] back (if any) and hands the free slots to
// the first waiters of KEYS[3] (of the first 16: one whose cap is lower
// than the slots held does not hold up those behind it) whose wait has
// not passed and whose cap has room, each told on its replica's channel ("slot held tag", the tag
// ARGV[4] naming the account); with a rate (ARGV[3]) whose window is
// full, the first waiter is told "slot -ms tag" instead, to come back
// then. With ARGV[5] '1' (one Redis, where PUBLISH counts every
// subscriber; on a Cluster it counts one node's), a slot whose message
// nobody heard is not handed: its waiter's replica does not hear its
// channel (its link is down, or it died with calls waiting), and the slot
// would have been held by nobody for a slot's life while the calls of
// the replicas that hear waited (the fault run's client 429s). That
// waiter takes again at its next look. It returns the slots handed.
var giveSlot = newScript(`
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if ARGV[1] ~= '' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('HDEL', KEYS[4], ARGV[1])
  redis.call('ZADD', KEYS[2], 'XX', now, ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local rate = tonumber(ARGV[3])
local handed = 0
local served = true
while served do
  served = false
  for _, slot in ipairs(redis.call('ZRANGE', KEYS[3], 0, 15)) do
    local limit, deadline, ch = string.match(redis.call('HGET', KEYS[4], slot) or '', '^(%d+) (%d+) (%S+)$')
    if not limit or tonumber(deadline) <= now then
      redis.call('ZREM', KEYS[3], slot)
      redis.call('HDEL', KEYS[4], slot)
    elseif redis.call('ZCARD', KEYS[1]) < tonumber(limit) then
      redis.call('ZREM', KEYS[3], slot)
      redis.call('HDEL', KEYS[4], slot)
      if rate > 0 then
        redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 1000)
        if redis.call('ZCARD', KEYS[2]) >= rate then
          local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
          redis.call('PUBLISH', ch, slot .. ' ' .. -math.max(1, tonumber(oldest[2]) + 1000 - now) .. ' ' .. ARGV[4])
          return handed
        end
        redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), slot)
        redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[2]) + 2000)
      end
      redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), slot)
      redis.call('PEXPIRE', KEYS[1], ARGV[2])
      local heard = redis.call('PUBLISH', ch, slot .. ' ' .. redis.call('ZCARD', KEYS[1]) .. ' ' .. ARGV[4])
      if heard == 0 and ARGV[5] == '1' then
        redis.call('ZREM', KEYS[1], slot)
        redis.call('ZREM', KEYS[2], slot)
      else
        handed = handed + 1
      end
      served = true
      break
    end
  end
end
return handed`)

var heldSlot = newScript(`
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return redis.call('ZCARD', KEYS[1]) end
if redis.call('ZSCORE', KEYS[3], ARGV[1]) then return 0 end
return -1`)

// renewSlot extends a held slot's life (ZADD XX: a slot that lapsed and
// was cleared is not taken again), and its place in the rate window
// (KEYS[2]) with it; 0 when it was not held.
var renewSlot = newScript(`
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local n = redis.call('ZADD', KEYS[1], 'XX', 'CH', now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if redis.call('ZADD', KEYS[2], 'XX', 'CH', now + tonumber(ARGV[2]), ARGV[1]) > 0 then
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[2]) + 2000)
end
return n`)

// announce records this replica in Redis every second and counts the
// replicas seen in the last five.
var announce = newScript(`
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 5000)
redis.call('PEXPIRE', KEYS[1], 10000)
return redis.call('ZCARD', KEYS[1])`)

// raiseEpoch raises the epoch to at least ARGV[1] and returns it.
var raiseEpoch = newScript(`
local cur = redis.call('GET', KEYS[1])
local n = tonumber(cur or '0')
if n == nil then return redis.error_reply('ERR value is not an integer') end
local want = tonumber(ARGV[1])
if n < want then redis.call('SET', KEYS[1], ARGV[1]); n = want end
return n`)

// scripts lists every script, for loading at connection.
var scripts = []*script{takeClaim, unclaim, shareClaim, raiseMark, getOrClaim, announcePeer, takeSlot, giveSlot, heldSlot, renewSlot, announce, raiseEpoch, addIntent, countPeers, readIntents}

// addIntent keeps a write's intent ARGV[3] in the set KEYS[1], scored by
// when its hold of ARGV[1] ms ends on Redis's clock, and drops those whose
// hold ended more than ARGV[2] ms ago (the marks' retention: by then
// every replica lifted them).
var addIntent = newScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]))
return 1`)

// countPeers returns how many other replicas than ARGV[1] announced
// themselves subscribed (announcePeer, KEYS[1]) in the last three seconds
// under one of the secrets' ids ARGV[2], …: those a message just
// published waits for.
var countPeers = newScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local kids, seen, n = {}, {}, 0
for i = 2, #ARGV do kids[ARGV[i]] = true end
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now - 3000, '+inf')) do
  local c = string.find(m, ':', 1, true)
  if c then
    local id = string.sub(m, c + 1)
    if kids[string.sub(m, 1, c - 1)] and id ~= ARGV[1] and not seen[id] then seen[id] = true; n = n + 1 end
  end
end
return n`)

// script is a Lua script and its SHA-1.
type script struct {
	*rueidis.Lua
	src, sha string
}

func newScript(src string) *script {
	sum := sha1.Sum([]byte(src))
	return &script{Lua: rueidis.NewLuaScript(src), src: src, sha: hex.EncodeToString(sum[:])}
}

// scriptRun is one run of a script, to send in a pipeline.
type scriptRun struct {
	s          *script
	keys, args []string
}

// with is a run of s on keys with args.
func (s *script) with(keys []string, args ...string) scriptRun {
	return scriptRun{s, keys, args}
}

// cmd is the run's EVALSHA.
func (r scriptRun) cmd(c rueidis.Client) rueidis.Completed {
	return c.B().Evalsha().Sha1(r.s.sha).Numkeys(int64(len(r.keys))).Key(r.keys...).Arg(r.args...).Build()
}

// again is res, the answer to cmd; or, if Redis did not know the script
// (NOSCRIPT: it did not run), the answer to running it by Exec.
func (r scriptRun) again(ctx context.Context, c rueidis.Client, res rueidis.RedisResult) rueidis.RedisResult {
	if err, ok := rueidis.IsRedisErr(res.Error()); ok && strings.HasPrefix(err.Error(), "NOSCRIPT") {
		trip(ctx)
		return r.s.Exec(ctx, c, r.keys, r.args)
	}
	return res
}

// loadScripts loads every script on every node of c (errors are left to
// the first run, which sends the script itself).
func loadScripts(ctx context.Context, c rueidis.Client) {
	for _, n := range c.Nodes() {
		cmds := make(rueidis.Commands, len(scripts))
		for i, s := range scripts {
			cmds[i] = n.B().ScriptLoad().Script(s.src).Build()
		}
		n.DoMulti(ctx, cmds...)
	}
}

// readIntents returns Redis's clock in milliseconds, then the intents in
// KEYS[1] with their scores (when their holds end), flat.
var readIntents = newScript(`
local t = redis.call('TIME')
local out = {tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)}
for _, v in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')) do out[#out + 1] = v end
return out`)
