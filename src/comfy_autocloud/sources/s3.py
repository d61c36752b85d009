"""`s3://bucket/key` sources (AWS S3 and S3-compatible stores: R2, MinIO, GCS interop) through boto3.

Credentials come from boto3's standard chain (environment, `AWS_PROFILE`/config files, SSO, instance
or container roles), the endpoint from `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`. Resolving makes
one signed HEAD (size, ETag, sha256 when the object carries one) and then a presigned GET URL that
the transfer engine downloads with its ranged, resumable machinery; nothing of the URL's signature is
ever printed (the display form is `s3://bucket/key`, the engine redacts `X-Amz-*` query values).

The presigned URL lives long enough for the download (an hour plus a second per MiB, at most the
7 days SigV4 allows); if it still expires, the engine fails on a 403 and the next fetch resolves a
fresh URL and resumes: resume state is keyed on scheme, host and path, not the query.

sha256 is taken from the object's own `ChecksumSHA256` (uploaded with `ChecksumAlgorithm=SHA256`,
single-part only: a multipart object's checksum is a checksum of part checksums) or from
`x-amz-meta-sha256` metadata; otherwise it is unknown and the engine's streaming hash is recorded.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote, unquote

from ..errors import SourceError
from ..redact import excerpt, redact_text
from ..transfer.http_policy import NotFound, Unauthorized, error_type
from . import ResolvedSource
from ._net import quiet_loggers

T = TypeVar("T")

PRESIGN_MIN_SECONDS = 3600
PRESIGN_MAX_SECONDS = 7 * 24 * 3600          # SigV4's limit
PRESIGN_ASSUMED_RATE = 1 << 20               # bytes/s a download is assumed to beat
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MULTIPART_ETAG = re.compile(r'-\d+"?$')
_KEY_SAFE = "/!$&'()*+,;=:@-._~"


@dataclass(frozen=True)
class S3Ref:
    bucket: str
    key: str  # may be '' or end with '/' for a prefix

    @property
    def text(self) -> str:
        return f"s3://{self.bucket}/{quote(self.key, safe=_KEY_SAFE)}"


@dataclass(frozen=True)
class S3Object:
    """One object listed under a prefix, for `autocloud manifest from-s3`."""

    key: str
    relpath: str            # key without the prefix: the file name in the manifest
    size: int
    sha256: str | None
    etag: str | None


def parse_s3(source: str, *, prefix: bool = False) -> S3Ref:
    """`s3://bucket/key` (percent-escapes decoded); with `prefix`, the key may be empty or a folder."""
    text = source.strip()
    if not text.lower().startswith("s3://"):
        raise SourceError(text, "expected s3://bucket/key")
    rest = text[5:]
    if "?" in rest or "#" in rest:
        raise SourceError(text, "an s3:// source takes no query or fragment")
    bucket, _, key = rest.partition("/")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise SourceError(text, f"bucket name {bucket!r} is not valid (letters, digits, '.', '-', '_')")
    key = unquote(key)
    if "\x00" in key or len(key.encode()) > 1024:
        raise SourceError(text, "object key contains a NUL byte or is longer than 1024 bytes")
    if not prefix and (not key or key.endswith("/")):
        raise SourceError(text, "expected s3://bucket/key naming one object (a key, not a folder)")
    return S3Ref(bucket, key)


def presign_seconds(size: int | None) -> int:
    """How long a presigned URL for `size` bytes should live: the whole download, with margin."""
    extra = (size or 0) // PRESIGN_ASSUMED_RATE
    return int(min(PRESIGN_MAX_SECONDS, PRESIGN_MIN_SECONDS + extra))


def sha256_from_head(head: dict[str, Any]) -> str | None:
    """A whole-object sha256 from HeadObject's answer, or None when the object does not carry one."""
    checksum = head.get("ChecksumSHA256")
    etag = str(head.get("ETag") or "")
    composite = head.get("ChecksumType") == "COMPOSITE" or _MULTIPART_ETAG.search(etag) is not None
    if isinstance(checksum, str) and "-" not in checksum and not composite:
        try:
            raw = base64.b64decode(checksum, validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) == 32:
            return raw.hex()
    meta = {str(k).lower(): v for k, v in (head.get("Metadata") or {}).items()}
    value = str(meta.get("sha256", "")).strip().lower().removeprefix("sha256:")
    return value if _SHA256.match(value) else None


# ---------------------------------------------------------------------------------------------- client

def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


_LOADER: Any = None
_LOADER_LOCK = threading.Lock()


def _botocore_session() -> Any:
    """A fresh session (credentials and config read now) sharing one data loader: the service models are
    parsed once per process instead of once per resolve (~0.2 s each)."""
    import botocore.loaders
    import botocore.session

    global _LOADER
    with _LOADER_LOCK:
        if _LOADER is None:
            _LOADER = botocore.loaders.create_loader()
        loader = _LOADER
    session = botocore.session.Session()
    session.register_component("data_loader", loader)
    return session


class _Client:
    """A boto3 S3 client plus what errors must never show (the secret key, the session token)."""

    def __init__(self, subject: str) -> None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise SourceError(subject, "s3:// sources need boto3: pip install 'comfyui-autocloud[s3]'") from None
        quiet_loggers("botocore.auth", "botocore.endpoint", "botocore.parsers", "urllib3.connectionpool")
        session = boto3.session.Session(botocore_session=_botocore_session())
        self.endpoint = _endpoint()
        self.client = session.client(
            "s3", region_name=session.region_name or "us-east-1", endpoint_url=self.endpoint,
            config=Config(signature_version="s3v4", connect_timeout=10, read_timeout=30,
                          retries={"mode": "standard", "max_attempts": 4}))
        self.secrets: list[str] = []
        try:
            creds = session.get_credentials()
        except Exception:  # a broken profile is reported by the first real call, with its reason
            creds = None
        if creds is not None:
            frozen = creds.get_frozen_credentials()
            self.secrets = [s for s in (frozen.secret_key, frozen.token, frozen.access_key) if s]

    def call(self, ref: S3Ref, what: Callable[[], T]) -> T:
        """Run one boto3 call; every failure becomes a SourceError naming the s3:// ref and the reason."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        subject = ref.text
        try:
            return what()
        except NoCredentialsError:
            raise SourceError(subject, "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                                       "AWS_PROFILE, or run with an instance/container role") from None
        except PartialCredentialsError as e:
            raise SourceError(subject, f"incomplete AWS credentials: {e.kwargs.get('cred_var', 'a value')} "
                                       "is missing") from None
        except EndpointConnectionError:
            where = self.endpoint or "the AWS S3 endpoint"
            raise SourceError(subject, f"cannot reach {where} (check AWS_ENDPOINT_URL and the network)") from None
        except ClientError as e:
            raise SourceError(subject, self._client_error(ref, e)) from None
        except BotoCoreError as e:
            raise SourceError(subject, redact_text(f"{type(e).__name__}: {excerpt(str(e))}", self.secrets)) from None

    def _client_error(self, ref: S3Ref, e: Any) -> str:
        err = e.response.get("Error", {}) or {}
        code = str(err.get("Code", ""))
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        failure = error_type(status)
        if code in ("NoSuchBucket",):
            return f"bucket {ref.bucket!r} does not exist"
        if failure is NotFound or code in ("NoSuchKey", "NotFound", "404"):
            return (f"bucket {ref.bucket!r} does not exist" if self._bucket_missing(ref)
                    else f"no object {ref.key!r} in bucket {ref.bucket!r}")
        if code == "InvalidAccessKeyId":
            return "access denied: the AWS access key id is not known to this endpoint (bad credentials)"
        if code == "SignatureDoesNotMatch":
            return "access denied: the AWS secret access key does not match the key id (bad credentials)"
        if code in ("ExpiredToken", "TokenRefreshRequired"):
            return "access denied: the AWS session token has expired; refresh the credentials"
        if failure is Unauthorized or code in ("AccessDenied", "403", "Forbidden"):
            return ("access denied (HTTP 403): the credentials are invalid, or lack s3:GetObject/s3:ListBucket "
                    "on this bucket")
        if status == 301 or code in ("PermanentRedirect", "301"):
            return "the bucket is in another region: set AWS_REGION (or AWS_DEFAULT_REGION) to its region"
        return redact_text(f"S3 answered HTTP {status or '?'} {code} {err.get('Message', '')}".strip(), self.secrets)

    def _bucket_missing(self, ref: S3Ref) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=ref.bucket)
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            return code in ("404", "NoSuchBucket", "NotFound")
        except BotoCoreError:
            return False
        return False

    def head(self, ref: S3Ref) -> dict[str, Any]:
        """HeadObject asking for checksums; stores that refuse the checksum header are asked plainly."""
        from botocore.exceptions import ClientError

        def plain() -> dict[str, Any]:
            return dict(self.client.head_object(Bucket=ref.bucket, Key=ref.key))

        def with_checksum() -> dict[str, Any]:
            try:
                return dict(self.client.head_object(Bucket=ref.bucket, Key=ref.key, ChecksumMode="ENABLED"))
            except ClientError as e:
                status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
                if status in (400, 501):
                    return plain()
                raise

        return self.call(ref, with_checksum)


# ---------------------------------------------------------------------------------------------- resolve

def resolve_s3(source: str) -> ResolvedSource:
    """HEAD for size and sha256, then a presigned GET sized to the object for the engine."""
    ref = parse_s3(source)
    client = _Client(ref.text)
    head = client.head(ref)
    size = head.get("ContentLength")
    size = size if isinstance(size, int) and size >= 0 else None
    url = client.call(ref, lambda: client.client.generate_presigned_url(
        "get_object", Params={"Bucket": ref.bucket, "Key": ref.key}, ExpiresIn=presign_seconds(size)))
    return ResolvedSource(kind="http", url=url, headers={}, display=ref.text, expected_sha256=sha256_from_head(head),
                          expected_size=size, filename=ref.key.rsplit("/", 1)[-1])


def list_prefix(source: str, *, checksums: bool = True, parallel: int = 8,
                page_size: int | None = None) -> tuple[S3Ref, list[S3Object]]:
    """Every object under `s3://bucket/prefix` (paginated); with `checksums`, HEAD each for its sha256.

    The prefix is a folder: `s3://b/loras` lists `loras/…`; keys ending in '/' (folder markers) are skipped.
    """
    ref = parse_s3(source, prefix=True)
    prefix = ref.key if not ref.key or ref.key.endswith("/") else ref.key + "/"
    ref = S3Ref(ref.bucket, prefix)
    client = _Client(ref.text)

    def pages() -> Iterator[dict[str, Any]]:
        paginator = client.client.get_paginator("list_objects_v2")
        config = {"PageSize": page_size} if page_size else {}
        yield from paginator.paginate(Bucket=ref.bucket, Prefix=prefix, PaginationConfig=config)

    listed: list[dict[str, Any]] = client.call(
        ref, lambda: [o for page in pages() for o in page.get("Contents", []) or []])
    objects = [o for o in listed if not str(o["Key"]).endswith("/")]

    def info(o: dict[str, Any]) -> S3Object:
        key = str(o["Key"])
        sha = sha256_from_head(client.head(S3Ref(ref.bucket, key))) if checksums else None
        return S3Object(key=key, relpath=key[len(prefix):], size=int(o.get("Size", 0)), sha256=sha,
                        etag=o.get("ETag"))

    with ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="autocloud-s3") as pool:
        return ref, list(pool.map(info, objects))


def object_source(bucket: str, key: str) -> str:
    """The source string for one object (percent-escaping what a manifest URL cannot hold)."""
    return S3Ref(bucket, key).text


__all__ = ["S3Object", "S3Ref", "list_prefix", "object_source", "parse_s3", "presign_seconds", "resolve_s3",
           "sha256_from_head"]
