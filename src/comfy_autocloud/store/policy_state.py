"""The adaptive eviction policy's learned state, kept beside the index so a new process need not relearn it.

Without it, the first eviction in every process replays the newest `POLICY_REPLAY` access-log rows
through six shadow caches (hundreds of milliseconds to seconds, on the first download that needs
room). With it, a process loads the state (`<root>/.autocloud/policy-state.json`, tens of KB for a
library of a thousand models) and replays only the rows logged after it was saved.

The file names the access-log row it was built up to (id, timestamp and key): a state whose row is
gone or differs (the index was rebuilt, the log trimmed past it) is ignored, as is a file that does
not parse or was saved for another cap or candidate set; the policy then replays the log as before.
Written atomically (readers see the old or the new file), every `SAVE_EVERY` rows observed.

Several processes sharing a cache: each feeds itself every access-log row in id order, so two
processes that start from the same state stay identical. A process adopts the saved file whenever
it was built at least as far as its own state (checked by a `stat` before each feed), so different
starting points converge to the one furthest along after one save; until then they may choose
different victims, each among the files its own shadows rank lowest.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from comfy_autocloud.fsutil import write_atomic
from comfy_autocloud.store.eviction import AdaptivePolicy, SettingsChanged
from comfy_autocloud.store.index import Index

log = logging.getLogger(__name__)
FORMAT = 1
SAVE_EVERY = 200  # access-log rows observed between two saves (one save costs a few ms)


@dataclass
class PolicyStateFile:
    """Load and save one store's adaptive-policy state; remembers which file version it last saw."""

    path: Path
    _seen_sig: tuple[int, int, int] | None = None

    def _sig(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def load_if_newer(self, policy: AdaptivePolicy, index: Index, own: int) -> int | None:
        """Adopt the saved state if it changed since last seen, is valid, and was built up to a row
        >= `own`; returns that row id (the policy now holds that state) or None (nothing changed)."""
        sig = self._sig()
        if sig is None or sig == self._seen_sig:
            return None
        self._seen_sig = sig
        try:
            doc: dict[str, Any] = json.loads(self.path.read_text(encoding="utf-8"))
            if doc.get("format") != FORMAT:
                raise ValueError(f"format {doc.get('format')!r}, expected {FORMAT}")
            built_to = int(doc["built_to"])
            if built_to < own:
                return None  # this process is further along: its next save wins
            row = index.access_row(built_to)
            if row is None or row != (float(doc["built_to_ts"]), str(doc["built_to_key"])):
                raise ValueError(f"built up to access-log row {built_to}, which the log no longer holds "
                                 "as saved (index rebuilt or log trimmed)")
            policy.load_state(doc["state"])
        except SettingsChanged as exc:  # the user changed the cap: expected, not worth a warning
            log.info("eviction policy state %s is for other settings; relearning from the access log: %s",
                     self.path, exc)
            return None
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            log.warning("eviction policy state %s ignored (relearning from the access log): %s", self.path, exc)
            return None
        return built_to

    def save(self, policy: AdaptivePolicy, index: Index, built_to: int) -> bool:
        """Write the state built up to access-log row `built_to`; False if that row is gone."""
        row = index.access_row(built_to)
        if row is None:
            return False
        doc = {"format": FORMAT, "built_to": built_to, "built_to_ts": row[0], "built_to_key": row[1],
               "state": policy.state()}
        try:
            write_atomic(self.path, json.dumps(doc, separators=(",", ":")))
        except OSError as exc:
            log.warning("cannot save the eviction policy state %s: %s", self.path, exc)
            return False
        self._seen_sig = self._sig()
        return True
