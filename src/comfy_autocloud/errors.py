"""One error family, so the CLI and ComfyUI can show every failure as 'thing: reason'.

Every message names the file, key or URL it is about (secrets already redacted) and why it failed.
"""

from __future__ import annotations


class AutoCloudError(Exception):
    """Base class: `subject` is the file/key/URL (redacted), `reason` the human explanation."""

    def __init__(self, subject: str, reason: str) -> None:
        self.subject = subject
        self.reason = reason
        super().__init__(f"{subject}: {reason}")


class ManifestError(AutoCloudError):
    """A manifest, config or workflow file is malformed or hostile. `where` is 'file:line' or 'file:key'."""


class SourceError(AutoCloudError):
    """A source string cannot be resolved (unknown scheme, bad reference, missing credentials)."""


class TransferError(AutoCloudError):
    """A download failed after retries (or at once for 4xx). `status` is the last HTTP status if any."""

    def __init__(self, subject: str, reason: str, *, status: int | None = None, retryable: bool = False) -> None:
        super().__init__(subject, reason)
        self.status = status
        self.retryable = retryable


class IntegrityError(AutoCloudError):
    """Downloaded bytes do not match the expected size or sha256."""


class BadContent(IntegrityError):
    """The bytes are not the kind of file their name says (an HTML error page, a Git LFS pointer, a
    truncated safetensors...): refused before commit, and another source may still have the real file."""


class NotEnoughSpace(AutoCloudError):
    """The cache cannot make room (cap or disk) for a file; raised before downloading when possible."""


class StoreError(AutoCloudError):
    """The local store refused an operation (bad key, pinned file, path escaping the cache...)."""


class Cancelled(AutoCloudError):
    """The operation was cancelled by the user; partial progress is kept for resuming."""
