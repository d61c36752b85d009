"""The fleet path of a fetch: local -> peers -> origin, one origin download per file fleet-wide.

First the peers holding a verified copy (announced with its sha256 in Redis), ranges from up to four of
them at once; when the whole file does not hash to the announced sha256 each peer is tried alone, and
the one whose bytes are wrong is marked bad fleet-wide and skipped; else the fleet-wide lease for the
key: the holder downloads from the origin (within the fleet's rate limits) while the others stream a
download in progress from a peer server (the downloader with the fewest followers: a chain, see
fleet/streams.py) and commit only when their bytes hash to what the holder verified. A holder that
dies loses its lease by expiry and the next node takes over. Redis unreachable: the node downloads
alone, exactly as without a fleet.

`FetchService` calls `fetch`, `announce`, `wait_for_download_slot` and `origin_options`; the bundle
path calls `from_holders` for its members. Downloads themselves go through the service's
`download_from` (same reservation, verification and commit as the local path).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from comfy_autocloud.errors import AutoCloudError, Cancelled, IntegrityError, NotEnoughSpace, TransferError
from comfy_autocloud.fetch.request import FetchRequest, FetchResult
from comfy_autocloud.fleet.conn import FleetUnavailable
from comfy_autocloud.progress import CancelToken, ProgressEvent
from comfy_autocloud.redact import redact_url
from comfy_autocloud.transfer import NotFound, TransferOptions, TransferResult, discard_partial

if TYPE_CHECKING:
    from comfy_autocloud.fetch.service import FetchService
    from comfy_autocloud.fleet.client import Fleet
    from comfy_autocloud.fleet.lease import LeaseInfo
    from comfy_autocloud.fleet.registry import Peer
    from comfy_autocloud.store import Entry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeerCopy:
    """The verified copy one peer announced."""

    node: str


@dataclass(frozen=True)
class PeerGroup:
    """Ranges from several peers announcing the copy with this sha256."""

    sha256: str


@dataclass(frozen=True)
class PeerStream:
    """A download in progress on `node`, under the lease with this fence."""

    node: str
    fence: int


FleetSource = PeerCopy | PeerGroup | PeerStream


class Tried:
    """The fleet sources that failed during one fetch: it does not ask them again."""

    def __init__(self) -> None:
        self._failed: set[FleetSource] = set()

    def add(self, source: FleetSource) -> None:
        self._failed.add(source)

    def __contains__(self, source: FleetSource) -> bool:
        return source in self._failed

    def dead_streams(self, fence: int) -> set[str]:
        """Nodes whose stream of the download under lease `fence` failed."""
        return {s.node for s in self._failed if isinstance(s, PeerStream) and s.fence == fence}


class FleetPath:
    """A FetchService's way through the fleet; safe to share between threads like the service."""

    def __init__(self, service: FetchService, fleet: Fleet) -> None:
        self.service = service
        self.fleet = fleet

    # -- what the service and the bundle path use ------------------------------------------------------------

    def fetch(self, req: FetchRequest) -> FetchResult | None:
        """Peers, then the lease (origin), else stream a download in progress; None: go on alone."""
        try:
            return self._fetch(req)
        except FleetUnavailable:
            return None  # logged once by the fleet; this node goes on alone

    def announce(self, key: str, sha256: str, size: int, evicted: Iterable[Entry] = ()) -> None:
        """Tell the fleet what this node now holds (and what making room for it evicted)."""
        for gone in evicted:
            self.fleet.withdraw(gone.key)
        self.fleet.announce(key, sha256, size)

    def wait_for_download_slot(self, cancel: CancelToken | None,
                               on_wait: Callable[[float], None] | None = None) -> None:
        """The fleet's origin downloads a minute per node (no-op without that limit)."""
        if self.fleet.downloads is not None:
            self.fleet.downloads.acquire(cancel, on_wait=on_wait)

    def origin_options(self, options: TransferOptions) -> TransferOptions:
        """`options` within the fleet-wide origin byte rate."""
        return self.fleet.origin_options(options)

    def from_holders(self, req: FetchRequest, tried: Tried) -> FetchResult | None:
        """The peers announcing a verified copy of the spec: several at once, then one by one; None if none."""
        spec = req.spec
        holders = [p for p in self.fleet.registry.holders(spec.key, spec.sha256) if PeerCopy(p.node) not in tried]
        group = _same_copy(holders)
        if len(group) >= 2 and PeerGroup(group[0].sha256) not in tried:
            got = self._from_peers(req, group[:self.fleet.config.peer_sources], tried)
            if got is not None:
                return got
        for peer in holders:
            if PeerCopy(peer.node) not in tried:
                got = self._from_peer(req, peer, tried)
                if got is not None:
                    return got
        return None

    # -- internals ---------------------------------------------------------------------------------------------

    def _fetch(self, req: FetchRequest) -> FetchResult | None:
        fleet, key = self.fleet, req.key
        deadline = time.monotonic() + fleet.config.max_wait
        tried = Tried()
        announced_wait = False
        while True:
            req.check_cancelled("waiting for the fleet")
            got = self.from_holders(req, tried)
            if got is not None:
                return got
            lease = fleet.leases.try_acquire(key)
            if lease is not None:
                with lease, self._streamable(key):
                    return self.service.from_origin(req)
            holder = fleet.leases.holder(key)
            holder_url = fleet.registry.node_url(holder.node) if holder is not None else None
            if holder is not None and holder.node != fleet.node_id and holder_url:
                dead = tried.dead_streams(holder.fence)
                if holder.node not in dead:
                    upstream = fleet.streams.choose(key, holder.node, dead)  # now counted as its follower
                    got = self._from_holder(req, holder, holder_url, upstream, tried)
                    if got is not None:
                        return got
            if time.monotonic() >= deadline:
                log.warning("%s: waited %.0fs for the fleet; downloading alone", key, fleet.config.max_wait)
                return None
            if not announced_wait:
                announced_wait = True
                who = f"node {holder.node}" if holder is not None else "another node"
                self.service.notify(req.progress, ProgressEvent(key, "wait",
                                                                message=f"{who} is fetching it from the origin"))
            time.sleep(fleet.config.poll)

    def _from_peer(self, req: FetchRequest, peer: Peer, tried: Tried) -> FetchResult | None:
        """A verified copy from one peer; a wrong hash marks the peer bad fleet-wide.

        Not when the download resumed bytes that came from elsewhere (a holder's stream): those may be
        the wrong ones, so the partial is dropped and this peer is asked again from the first byte.
        """
        fleet, spec = self.fleet, req.spec
        source = fleet.peer_source(peer, spec.key)
        resumed: list[int] = []
        try:
            return self.service.download_from(req, source, options=fleet.peer_options(self.service.options),
                                              attempts=1,
                                              on_mismatch=lambda _part, r: resumed.append(r.resumed_bytes))
        except IntegrityError as exc:
            if resumed and resumed[0] > 0:
                log.warning("%s: resumed bytes did not check out; asking %s again from the start", spec.key,
                            peer.node)
                return self._from_peer(req, peer, tried)  # the partial is gone now
            fleet.registry.mark_bad(peer.node, f"{spec.key}: {exc.reason}"[:200])
        except (Cancelled, NotEnoughSpace):
            raise
        except AutoCloudError as exc:
            if isinstance(exc, NotFound):
                fleet.withdraw(spec.key, peer.node)  # it evicted the file since announcing it
            log.info("%s: peer %s failed: %s", spec.key, peer.node, exc.reason)
        discard_partial(self.service.store.partial_path(spec.key))
        tried.add(PeerCopy(peer.node))
        return None

    def _from_peers(self, req: FetchRequest, peers: list[Peer], tried: Tried) -> FetchResult | None:
        """Ranges from several peers at once; the whole file must hash to the sha256 they announced.

        A wrong hash doesn't say which peer lied, so the mixed bytes are kept aside, the file is taken
        from one peer at a time (a peer whose own bytes are wrong is marked bad on the way), and the
        verified copy then tells which peers sent wrong ranges: those are marked bad too. A peer that
        fails mid-way is dropped by the engine and the others finish.
        """
        fleet, spec = self.fleet, req.spec
        source, mirrors = fleet.peers_source(peers, spec.key)
        by_display = {redact_url(source.url): peers[0]}
        by_display.update({m.display: p for m, p in zip(mirrors, peers[1:], strict=True)})
        options = fleet.peer_options(self.service.options)
        options = replace(options, mirrors=mirrors, connections=max(options.connections or 1, len(peers)))
        suspect: list[tuple[Path, TransferResult]] = []

        def keep_aside(part: Path, result: TransferResult) -> None:
            aside = part.with_name(part.name + ".suspect")
            os.replace(part, aside)
            suspect.append((aside, result))

        try:
            return self.service.download_from(req, source, options=options, attempts=1, on_mismatch=keep_aside)
        except (Cancelled, NotEnoughSpace):
            _drop_suspect(suspect)
            raise
        except AutoCloudError as exc:
            log.info("%s: ranges from %s failed: %s; trying them one by one", spec.key, source.display, exc.reason)
        discard_partial(self.service.store.partial_path(spec.key))
        tried.add(PeerGroup(peers[0].sha256))
        if not suspect:
            return None
        try:
            for peer in peers:
                if PeerCopy(peer.node) in tried:
                    continue
                got = self._from_peer(req, peer, tried)
                if got is not None:
                    aside, result = suspect[0]
                    for display, ranges in result.source_ranges.items():
                        who = by_display.get(display)
                        if who is not None and who.node != peer.node and not _same_ranges(aside, got.path, ranges):
                            log.warning("%s: peer %s sent bytes that differ from the verified copy", spec.key,
                                        who.node)
                            fleet.registry.mark_bad(who.node, f"{spec.key}: sent wrong byte ranges")
                    return got
            return None
        finally:
            _drop_suspect(suspect)

    def _from_holder(self, req: FetchRequest, holder: LeaseInfo, holder_url: str, upstream: str,
                     tried: Tried) -> FetchResult | None:
        """Stream a download in progress (the lease holder's, or another follower's: see fleet/streams.py),
        `upstream` having counted this node as its follower; commit only bytes that hash to what the
        holder verified."""
        fleet = self.fleet
        try:
            base_url = holder_url if upstream == holder.node else fleet.registry.node_url(upstream)
            if base_url is None:  # it stopped heartbeating: not a source
                tried.add(PeerStream(upstream, holder.fence))
                return None
            return self._stream_from(req, holder, holder_url, upstream, base_url, tried)
        finally:
            with contextlib.suppress(FleetUnavailable):
                fleet.streams.unfollow(req.key, upstream)
                fleet.streams.done(req.key)

    def _stream_from(self, req: FetchRequest, holder: LeaseInfo, holder_url: str, upstream: str, base_url: str,
                     tried: Tried) -> FetchResult | None:
        fleet, key = self.fleet, req.key
        source = fleet.partial_source(base_url, holder, key, upstream)

        def expect(result: TransferResult) -> str | None:
            sha = fleet.verified_sha(holder_url, key, result.size, timeout=max(10.0, fleet.config.lease_ttl))
            if sha is None:
                raise TransferError(source.display, "the holder never produced a verified copy to compare with")
            return sha

        try:
            return self.service.download_from(req, source, options=fleet.peer_options(self.service.options),
                                              expect=expect, attempts=1)
        except (Cancelled, NotEnoughSpace):
            raise
        except AutoCloudError as exc:
            if isinstance(exc, NotFound) and upstream == holder.node:
                return None  # its download has not started writing yet (or just ended): look again
            log.info("%s: streaming from %s failed: %s", key, upstream, exc.reason)
        tried.add(PeerStream(upstream, holder.fence))
        return None  # the partial stays: the next source resumes it (the final sha256 check covers it)

    @contextlib.contextmanager
    def _streamable(self, key: str) -> Iterator[None]:
        """While this node downloads `key`, other nodes may stream it from here (best effort)."""
        with contextlib.suppress(FleetUnavailable):
            self.fleet.streams.downloading(key)
        try:
            yield
        finally:
            with contextlib.suppress(FleetUnavailable):
                self.fleet.streams.done(key)


def _drop_suspect(suspect: list[tuple[Path, TransferResult]]) -> None:
    for aside, _ in suspect:
        with contextlib.suppress(FileNotFoundError):
            aside.unlink()


def _same_ranges(a: Path, b: Path, ranges: list[tuple[int, int]], block: int = 1 << 20) -> bool:
    """Whether files `a` and `b` hold the same bytes in every [start, end) of `ranges`."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for start, end in ranges:
            pos = start
            while pos < end:
                n = min(block, end - pos)
                if os.pread(fa.fileno(), n, pos) != os.pread(fb.fileno(), n, pos):
                    return False
                pos += n
    return True


def _same_copy(peers: list[Peer]) -> list[Peer]:
    """The largest group of peers announcing the same (sha256, size): only those can share a download."""
    groups: dict[tuple[str, int], list[Peer]] = {}
    for peer in peers:
        groups.setdefault((peer.sha256, peer.size), []).append(peer)
    return max(groups.values(), key=len, default=[])
