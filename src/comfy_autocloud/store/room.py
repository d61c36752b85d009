"""Making room: how many bytes a download needs under the cap and on each disk, and which files go.

Pure decisions over `eviction.Item`s and disk figures; the store reads the figures, runs these inside
its index transaction and removes what they choose. Which files a policy prefers to evict is the
policy's business (`eviction.select_victims`); how much must go, and on which device, is decided here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from comfy_autocloud.errors import NotEnoughSpace
from comfy_autocloud.store.eviction import Item, Policy, bytes_freed, select_victims
from comfy_autocloud.store.layout import TEMP_RESERVE
from comfy_autocloud.store.partials import IdlePartial
from comfy_autocloud.store.space import allocated, disk_space
from comfy_autocloud.units import human_size


def unique_bytes(items: Iterable[Item]) -> int:
    """Bytes on disk: hardlinked twins (same device and inode) counted once."""
    seen: set[object] = set()
    total = 0
    for it in items:
        if it.group is None:
            total += it.size
        elif it.group not in seen:
            seen.add(it.group)
            total += it.size
    return total


def on_dev(item: Item, dev: int) -> bool:
    """Whether evicting `item` frees space on device `dev` (unknown device: assume it does)."""
    return not isinstance(item.group, tuple) or item.group[0] == dev


@dataclass(frozen=True)
class DiskNeed:
    """What one filesystem must hold for a download."""

    dev: int
    need: int         # bytes still to write there
    free: int         # free now
    where: Path       # named in errors
    outstanding: int  # promised to other downloads growing there
    keep: int         # bytes kept free


def disk_needs(part: Path, final: Path, nbytes: int, others: Iterable[tuple[Path, int]],
               min_free_disk: int, *, part_in_ram: bool) -> list[DiskNeed]:
    """The partial grows at `part` (preallocated bytes already count); when the model folder is another
    filesystem, commit copies the whole file there as well. `others`: (partial path, reserved bytes) of
    downloads in progress. A RAM-disk partial keeps only TEMP_RESERVE free (it was chosen because it fits).
    """
    part_dir = part.parent
    p_free, _t, p_dev = disk_space(part_dir)
    outstanding = sum(max(0, n - allocated(other)) for other, n in others if other.parent == part_dir)
    need_part = max(0, nbytes - allocated(part))
    f_free, _t, f_dev = disk_space(final.parent)
    keep_part = min(TEMP_RESERVE, min_free_disk) if part_in_ram else min_free_disk
    if f_dev == p_dev:
        return [DiskNeed(p_dev, need_part, p_free, final.parent, outstanding, keep_part)]
    return [DiskNeed(p_dev, need_part, p_free, part_dir, outstanding, keep_part),
            DiskNeed(f_dev, nbytes, f_free, final.parent, 0, min_free_disk)]


def room_for(policy: Policy, items: list[Item], *, key: str, nbytes: int, replaced: int, reserved: int,
             max_size: int | None, disks: list[DiskNeed],
             stopped: Callable[[int], list[IdlePartial]] = lambda dev: []) -> tuple[list[Item], list[IdlePartial]]:
    """The files to evict and the stopped partial downloads to remove so `nbytes` more fit under the cap and
    on every disk, or NotEnoughSpace saying why.

    `replaced`: bytes of the old version of `key` that the new one frees; `reserved`: bytes promised to
    other downloads in progress; `stopped(dev)`: partials of downloads that stopped on that device, oldest
    first; they go only when evicting is not enough (they are resumable work), and are named when even
    they are not.
    """
    used = unique_bytes(items)
    freeable = bytes_freed(select_victims(policy, items, 2**62), items)
    victims: list[Item] = []
    drop: list[IdlePartial] = []
    if max_size is not None:
        need_cap = used - replaced + reserved + nbytes - max_size
        if need_cap > 0:
            victims = select_victims(policy, items, need_cap)
            if bytes_freed(victims, items) < need_cap:
                msg = (f"needs {human_size(nbytes)}, cap {human_size(max_size)}, "
                       f"{human_size(used - freeable)} held by pinned/in-use files")
                if reserved:
                    msg += f", {human_size(reserved)} reserved by downloads in progress"
                raise NotEnoughSpace(key, msg)

    for d in disks:
        freed_dev = bytes_freed([it for it in victims if on_dev(it, d.dev)], items)
        short = d.need + d.outstanding + d.keep - d.free - freed_dev
        if d.need <= 0 or short <= 0:
            continue
        chosen = {v.key for v in victims}
        rest = [it for it in items if it.key not in chosen and on_dev(it, d.dev)]
        more = select_victims(policy, rest, short)
        more_freed = bytes_freed(more, rest)
        if more_freed < short:
            idle = stopped(d.dev)
            held = sum(p.nbytes for p in idle)
            if more_freed + held < short:
                msg = (f"needs {human_size(d.need)} + {human_size(d.keep)} kept free, disk has "
                       f"{human_size(d.free)} free at {d.where}")
                if d.outstanding:
                    msg += f", {human_size(d.outstanding)} promised to downloads in progress"
                msg += (f"; evicting every unpinned, unused file would free only "
                        f"{human_size(freed_dev + more_freed)}")
                if idle:
                    msg += (f"; {len(idle)} stopped partial download(s) hold {human_size(held)} in "
                            f"{', '.join(sorted({str(p.files[0].parent) for p in idle}))}, not enough either "
                            "(fetching those files again resumes them; `autocloud verify` removes them an hour "
                            "after they stopped)")
                raise NotEnoughSpace(key, msg)
            left = short - more_freed
            for p in idle:
                if left <= 0:
                    break
                drop.append(p)
                left -= p.nbytes
        victims += more
    return victims, drop


def over_watermark(policy: Policy, items: list[Item], reserved: int, max_size: int | None,
                   high: float, low: float) -> list[Item]:
    """Past the high watermark of the cap, the files to evict to get down to the low one."""
    if max_size is None:
        return []
    used = unique_bytes(items) + reserved
    if used <= high * max_size:
        return []
    return select_victims(policy, items, int(used - low * max_size))
