"""Who is downloading a key right now, and how many nodes stream from each of them.

While a lease holder downloads a file from the origin, the other nodes stream it from a peer's download
in progress. If they all streamed from the holder, the holder would send N-1 copies while downloading
its own (its CPU and uplink then set everyone's pace). Instead every node that downloads a key is a
source for the next one: a new follower picks the downloader with the fewest followers (the holder
when tied), so four nodes arriving together form a chain holder -> a -> b -> c and each sends one copy.

Redis hashes `streams:<key>` (node -> followers it has) and `streams-from:<key>` (follower -> its
source). A follower never picks a node that streams, directly or down the chain, from itself (no
cycles when a source fails and its followers look for another), and a follower whose holder failed
waits for the lease to change hands instead of picking a follower of that holder. Choosing a source,
counting this node as its follower and offering this node as a source is one Lua script, so followers
arriving at the same moment spread out instead of all picking the holder. Entries are best
effort (a crashed node's entry stays until the hashes expire, STREAMS_TTL after the last change); a
follower whose source stops falls back to the next candidate, and every follower still checks the
whole file against the sha256 the lease holder verified.
"""

from __future__ import annotations

from comfy_autocloud.fleet.conn import RedisGate

STREAMS_TTL_MS = 600_000


class Streams:
    def __init__(self, gate: RedisGate, node_id: str) -> None:
        self.gate = gate
        self.node_id = node_id
        self._choose = gate.script(CHOOSE)

    def _key(self, key: str) -> str:
        return self.gate.key("streams", key)

    def _links(self, key: str) -> str:
        return self.gate.key("streams-from", key)

    def downloading(self, key: str) -> None:
        """This node downloads `key` now (from the origin or from a peer): others may stream from it."""
        name = self._key(key)

        def go(r):  # type: ignore[no-untyped-def]
            p = r.pipeline(transaction=True)
            p.hsetnx(name, self.node_id, 0)
            p.pexpire(name, STREAMS_TTL_MS)
            p.execute()

        self.gate.run(go)

    def done(self, key: str) -> None:
        """This node's download of `key` ended (committed or failed)."""
        self.gate.run(lambda r: r.hdel(self._key(key), self.node_id))

    def unfollow(self, key: str, source: str) -> None:
        """This node stopped streaming `key` from `source`."""
        name, links = self._key(key), self._links(key)

        def go(r):  # type: ignore[no-untyped-def]
            p = r.pipeline(transaction=True)
            p.hdel(links, self.node_id)
            if r.hexists(name, source):  # unless the source finished and left meanwhile
                p.hincrby(name, source, -1)
            p.execute()

        self.gate.run(go)

    def choose(self, key: str, holder: str, exclude: set[str]) -> str:
        """Pick a source and start following it, in one step (so followers arriving together spread out).

        The downloader of `key` with the fewest followers, not this node, not in `exclude`, not streaming
        from this node down some chain; the holder wins a tie and is the answer when nobody else downloads.
        This node is then counted as the source's follower and becomes a source itself. A failed holder (in
        `exclude`) is answered as is and nothing is recorded: its followers are no better a source.
        """
        return str(self.gate.run(lambda r: self._choose(
            keys=[self._key(key), self._links(key)],
            args=[self.node_id, holder, STREAMS_TTL_MS, *sorted(exclude)], client=r)))


CHOOSE = """
local me, holder = ARGV[1], ARGV[2]
local excluded = {}
for i = 4, #ARGV do excluded[ARGV[i]] = true end
if excluded[holder] then return holder end
local links = {}
local raw = redis.call('HGETALL', KEYS[2])
for i = 1, #raw, 2 do links[raw[i]] = raw[i + 1] end
local function downstream(node)
  local seen = {}
  while links[node] and not seen[node] do
    seen[node] = true
    node = links[node]
    if node == me then return true end
  end
  return false
end
local candidates = {[holder] = 0}
raw = redis.call('HGETALL', KEYS[1])
for i = 1, #raw, 2 do
  local node, n = raw[i], tonumber(raw[i + 1])
  if n and node ~= me and not excluded[node] and not downstream(node) then candidates[node] = n end
end
local best, best_n
for node, n in pairs(candidates) do
  local better = best == nil or n < best_n
  if not better and n == best_n then
    if node == holder then better = true
    elseif best ~= holder and node < best then better = true end
  end
  if better then best, best_n = node, n end
end
redis.call('HINCRBY', KEYS[1], best, 1)
redis.call('HSET', KEYS[2], me, best)
redis.call('HSETNX', KEYS[1], me, 0)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return best
"""
