"""What ComfyUI may offer: manifest entries indexed by ComfyUI folder name and file name.

ComfyUI knows `clip` as `text_encoders` and `unet` as `diffusion_models` (folder_paths.map_legacy);
a manifest may use either, so lookups go through the same mapping.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Collection, Iterable

from comfy_autocloud.errors import ManifestError
from comfy_autocloud.manifest.merge import merge_pair
from comfy_autocloud.manifest.spec import ModelSpec
from comfy_autocloud.manifest.workflow import LEGACY_FOLDERS

log = logging.getLogger(__name__)


def comfy_folder(folder: str) -> str:
    """ComfyUI's canonical name for a model folder (what its loaders pass to folder_paths)."""
    return LEGACY_FOLDERS.get(folder, folder)


def normalize_name(filename: str) -> str:
    """File names as ComfyUI compares them: '/'-separated (Windows UIs send backslashes)."""
    return filename.replace("\\", "/")


def extension_ok(filename: str, extensions: Collection[str]) -> bool:
    """folder_paths.filter_files_extensions' rule: empty set means every extension."""
    return not extensions or os.path.splitext(filename)[1].lower() in extensions


def merge_names(on_disk: Iterable[str], offered: Iterable[str], extensions: Collection[str]) -> list[str]:
    """The list a loader shows: files on disk plus manifest entries, sorted, each once."""
    names = set(on_disk)
    names.update(n for n in offered if extension_ok(n, extensions))
    return sorted(names)


ORIGINS = ("manifest", "workflow", "request")  # AUTOCLOUD_MANIFEST, a workflow's hints, POST /autocloud/fetch
PROMPT_WINDOW = 60.0  # seconds a workflow's hinted model is listed after a prompt named it (its validation)


class Catalog:
    """Thread-safe index of ModelSpecs by (ComfyUI folder, filename); later additions merge sources.

    Each entry remembers where it was first defined (one of ORIGINS), so the panel can say so and a
    failed download of something a workflow or a request added can be dropped again.
    """

    def __init__(self, specs: Iterable[ModelSpec] = (), origin: str = "manifest") -> None:
        self._lock = threading.Lock()
        self._by_name: dict[tuple[str, str], ModelSpec] = {}
        self._origin: dict[tuple[str, str], str] = {}
        self._listed_until: dict[tuple[str, str], float] = {}  # workflow hints a queued prompt needs listed
        self.add(specs, origin)

    def add(self, specs: Iterable[ModelSpec], origin: str = "manifest") -> list[ModelSpec]:
        """Add or merge specs (sources of the same key are combined); returns the stored versions.

        An entry that contradicts one already known (other sha256, unproven other URL) is logged and
        ignored: the first definition (the operator's manifest) keeps serving, and keeps its origin.
        """
        out = []
        with self._lock:
            for spec in specs:
                k = (comfy_folder(spec.folder), spec.filename)
                old = self._by_name.get(k)
                if old is not None:
                    try:
                        spec = merge_pair(old, spec)
                    except ManifestError as exc:
                        log.warning("autocloud: ignoring %s", exc)
                        spec = old
                self._by_name[k] = spec
                self._origin.setdefault(k, origin)
                out.append(spec)
        return out

    def lookup(self, folder: str, filename: str) -> ModelSpec | None:
        with self._lock:
            return self._by_name.get((comfy_folder(folder), normalize_name(filename)))

    def origin(self, folder: str, filename: str) -> str | None:
        """Where the entry came from (one of ORIGINS), None if unknown."""
        with self._lock:
            return self._origin.get((comfy_folder(folder), normalize_name(filename)))

    def remove(self, folder: str, filename: str, *, unless: str = "manifest") -> bool:
        """Forget an entry (a workflow's or a request's URL that failed); the `unless` origin stays."""
        k = (comfy_folder(folder), normalize_name(filename))
        with self._lock:
            if k not in self._by_name or self._origin.get(k) == unless:
                return False
            del self._by_name[k]
            self._origin.pop(k, None)
            self._listed_until.pop(k, None)
            return True

    def show(self, specs: Iterable[ModelSpec], seconds: float = PROMPT_WINDOW) -> None:
        """List these workflow hints for `seconds` (the prompt that named them is validated against the
        loaders' lists); once downloaded they are listed from the disk like any file."""
        until = time.monotonic() + seconds
        with self._lock:
            for spec in specs:
                self._listed_until[(comfy_folder(spec.folder), spec.filename)] = until

    def names(self, folder: str) -> list[str]:
        """What loaders offer: manifest and requested entries, and a workflow's hints only while a prompt
        that names them is being queued (another user's lists do not grow with every workflow opened)."""
        folder = comfy_folder(folder)
        now = time.monotonic()
        with self._lock:
            return sorted(name for (f, name) in self._by_name if f == folder and (
                self._origin.get((f, name)) != "workflow" or self._listed_until.get((f, name), 0) > now))

    def folders(self) -> list[str]:
        """Store folder names used by the manifest (as written, so the cache layout matches)."""
        with self._lock:
            return sorted({s.folder for s in self._by_name.values()})

    def replace(self, specs: Iterable[ModelSpec], origin: str = "manifest") -> None:
        """Swap in a whole new set of one origin at once (a reloaded manifest: removed entries go, changed
        ones change); entries of other origins stay unless the new set defines them."""
        fresh = Catalog(specs, origin)
        with self._lock:
            others = [(s, o) for k, s in self._by_name.items() if (o := self._origin[k]) != origin]
            self._by_name, self._origin = fresh._by_name, fresh._origin
        for spec, o in others:  # merged into a new entry of the same key, or kept as it was
            self.add([spec], o)

    def specs(self) -> list[ModelSpec]:
        with self._lock:
            return list(self._by_name.values())

    def entries(self) -> list[tuple[ModelSpec, str]]:
        """(spec, origin) of every entry."""
        with self._lock:
            return [(s, self._origin[k]) for k, s in self._by_name.items()]

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_name)
