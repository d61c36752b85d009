"""Who is downloading a key right now, and how many nodes stream from each of them.

While a lease holder downloads a file from the origin, the other nodes stream it from a peer's download
in progress. If they all streamed from the holder, the holder would send N-1 copies while downloading
its own (its CPU and uplink then set everyone's pace). Instead every node that downloads a key is a
source for the next one: a new follower picks the downloader with the fewest followers (the holder
when tied), so four nodes arriving together form a chain holder -> a -> b -> c and each sends one copy.

Redis hashes `streams:<key>` (node -> followers it has) and `streams-from:<key>` (follower -> its
source). A follower never picks a node that streams, directly or down the chain, from itself (no
cycles when a source fails and its followers look for another), and a follower whose holder failed
waits for the lease to change hands instead of picking a follower of that holder. Entries are best
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

    def _key(self, key: str) -> str:
        return self.gate.key("streams", key)

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

    def follow(self, key: str, source: str, delta: int = 1) -> None:
        """This node starts (delta 1) or stops (delta -1) streaming `key` from `source`."""
        name, links = self._key(key), self.gate.key("streams-from", key)

        def go(r):  # type: ignore[no-untyped-def]
            p = r.pipeline(transaction=True)
            if delta > 0:
                p.hincrby(name, source, 1)
                p.hset(links, self.node_id, source)
            else:
                p.hdel(links, self.node_id)
                if r.hexists(name, source):  # unless the source finished and left meanwhile
                    p.hincrby(name, source, -1)
            for k in (name, links):
                p.pexpire(k, STREAMS_TTL_MS)
            p.execute()

        self.gate.run(go)

    def pick(self, key: str, holder: str, exclude: set[str]) -> str:
        """The downloader of `key` with the fewest followers, not this node, not in `exclude`, not streaming
        from this node down some chain; the holder wins a tie and is the answer when nobody else downloads.
        A failed holder (in `exclude`) is answered as is: its followers are no better a source."""
        if holder in exclude:
            return holder

        def go(r):  # type: ignore[no-untyped-def]
            p = r.pipeline(transaction=False)
            p.hgetall(self._key(key))
            p.hgetall(self.gate.key("streams-from", key))
            return p.execute()

        counts, links = self.gate.run(go)
        candidates: dict[str, int] = {holder: 0}  # registered or not: it downloads from the origin all the same
        for node, n in counts.items():
            if node == self.node_id or node in exclude or self._downstream(node, links):
                continue
            try:
                candidates[node] = int(n)
            except ValueError:
                continue
        return min(candidates, key=lambda node: (candidates[node], node != holder, node))

    def _downstream(self, node: str, links: dict[str, str]) -> bool:
        """Whether `node` streams from this node, directly or through others."""
        seen: set[str] = set()
        while node in links and node not in seen:
            seen.add(node)
            node = links[node]
            if node == self.node_id:
                return True
        return False
