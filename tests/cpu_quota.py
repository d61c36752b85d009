"""Give a group of processes its own share of the machine's cores (a cgroup CPU quota), so several
"nodes" on one machine each behave like a machine with that many cores instead of fighting over all of
them. Needs root and a cgroup v1 `cpu` or v2 `cpu.max` controller; `CpuQuota.root()` is None otherwise."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

PERIOD_US = 100_000


class CpuQuota:
    """One cgroup whose processes together get at most `cpus` cores."""

    CANDIDATES = (Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))

    def __init__(self, name: str, cpus: float) -> None:
        root = self.root()
        if root is None:
            raise RuntimeError("no writable cgroup cpu controller here (needs root and cgroup cpu)")
        self.path = root / f"autocloud-{name}-{uuid.uuid4().hex[:8]}"
        self.path.mkdir()
        quota = max(1000, int(PERIOD_US * cpus))
        if (self.path / "cpu.max").exists():
            (self.path / "cpu.max").write_text(f"{quota} {PERIOD_US}\n")
        else:
            (self.path / "cpu.cfs_period_us").write_text(f"{PERIOD_US}\n")
            (self.path / "cpu.cfs_quota_us").write_text(f"{quota}\n")
        self.cpus = cpus

    @classmethod
    def root(cls) -> Path | None:
        """A cgroup directory where a child with a CPU quota can be made, or None."""
        if os.geteuid() != 0:
            return None
        for root in cls.CANDIDATES:
            if (root / "cpu.cfs_quota_us").exists() or ((root / "cgroup.subtree_control").exists() and \
                    "cpu" in (root / "cgroup.subtree_control").read_text().split()):
                probe = root / f"autocloud-probe-{uuid.uuid4().hex[:8]}"
                try:
                    probe.mkdir()
                except OSError:
                    continue
                ok = (probe / "cpu.cfs_quota_us").exists() or (probe / "cpu.max").exists()
                probe.rmdir()
                if ok:
                    return root
        return None

    def join(self) -> None:
        """Move the calling process into the group (use as a child's `preexec_fn`, before exec)."""
        (self.path / "cgroup.procs").write_text(f"{os.getpid()}\n")

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.rmdir()
