"""How a commit reaches the disk (Store.commit): fsync first, fsync later with a check after a crash, never.

A module of its own so that a command can offer the choice (`autocloud warmup --durability`) without
importing the store and SQLite.
"""

from __future__ import annotations

from typing import Literal

Durability = Literal["durable", "deferred", "ephemeral"]
DURABILITIES: tuple[Durability, ...] = ("durable", "deferred", "ephemeral")
