"""Failures: fatal statuses, retries with backoff, resets, lying origins, redirects, secrets, timeouts."""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import pytest

from comfy_autocloud.errors import IntegrityError, TransferError
from comfy_autocloud.sources._net import request
from comfy_autocloud.transfer import (
    Gone,
    NotFound,
    RetryPolicy,
    Throttled,
    TransferOptions,
    Unauthorized,
    download,
    parse_retry_after,
)
from servers import AUTH_TOKEN, Behaviour, ChaosOrigin, NginxOrigin, random_bytes

MiB = 1 << 20
FAST = RetryPolicy(attempts=3, backoff_base=0.05, backoff_max=0.2)


def test_404_fails_at_once(nginx_origin: NginxOrigin, tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(TransferError) as ei:
        download(nginx_origin.url("missing-404.bin"), tmp_path / "x.part", TransferOptions())
    assert ei.value.status == 404 and "404" in str(ei.value)
    assert time.monotonic() - t0 < 2
    assert nginx_origin.requests("missing-404.bin") == 1


@pytest.mark.parametrize("status", [401, 410])
def test_auth_and_gone_fail_at_once(nginx_origin: NginxOrigin, tmp_path: Path, status: int) -> None:
    path = "auth/whatever.bin" if status == 401 else "s410/x.bin"
    with pytest.raises(TransferError) as ei:
        download(nginx_origin.url(path), tmp_path / "x.part", TransferOptions())
    assert ei.value.status == status
    assert nginx_origin.requests(path) == 1


@pytest.mark.parametrize(("path", "kind"), [("missing-typed.bin", NotFound), ("auth/typed.bin", Unauthorized),
                                          ("s410/typed.bin", Gone), ("s429/typed.bin", Throttled)])
def test_failures_are_typed_by_status(nginx_origin: NginxOrigin, tmp_path: Path, path: str, kind: type) -> None:
    """Callers branch on the error's type, not on numbers (a fleet peer's 404, a token refused)."""
    with pytest.raises(kind) as ei:
        download(nginx_origin.url(path), tmp_path / "x.part", TransferOptions(retry=RetryPolicy.never()))
    assert isinstance(ei.value, TransferError) and path in str(ei.value)


def test_auth_header_is_sent(nginx_origin: NginxOrigin, random_file, tmp_path: Path) -> None:
    want = random_file(nginx_origin.data_dir / "private.bin", 2 * MiB, seed=30)
    r = download(nginx_origin.url("auth/private.bin"), tmp_path / "p.part",
                 TransferOptions(headers={"Authorization": AUTH_TOKEN}))
    assert r.sha256 == want


@pytest.mark.parametrize("status", [500, 503])
def test_5xx_retried_then_error(nginx_origin: NginxOrigin, tmp_path: Path, status: int) -> None:
    path = f"s{status}/file.bin"
    with pytest.raises(TransferError) as ei:
        download(nginx_origin.url(path), tmp_path / "x.part", TransferOptions(retry=FAST))
    assert ei.value.status == status and ei.value.retryable
    assert "3 attempts" in ei.value.reason
    assert nginx_origin.requests(path) == 3


def test_429_honours_retry_after(nginx_origin: NginxOrigin, tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(TransferError) as ei:
        download(nginx_origin.url("s429/file.bin"), tmp_path / "x.part", TransferOptions(retry=FAST))
    elapsed = time.monotonic() - t0
    assert ei.value.status == 429
    assert nginx_origin.requests("s429/file.bin") == 3
    assert 1.9 <= elapsed < 6  # two waits of `Retry-After: 1`, not the 0.05 s backoff


def test_transient_failures_then_success(chaos_origin: ChaosOrigin, tmp_path: Path) -> None:
    data = random_bytes(3 * MiB, seed=31)
    url = chaos_origin.add("flaky", Behaviour(data=data, fail_first=2, fail_status=503, retry_after="0"))
    r = download(url, tmp_path / "f.part", TransferOptions(retry=FAST))
    assert r.sha256 == hashlib.sha256(data).hexdigest()


def test_reset_mid_body_is_retried(chaos_origin: ChaosOrigin, tmp_path: Path) -> None:
    data = random_bytes(6 * MiB + 17, seed=32)
    url = chaos_origin.add("reset", Behaviour(data=data, reset_after=300_000, reset_times=4))
    r = download(url, tmp_path / "r.part", TransferOptions(connections=2, retry=FAST))
    assert r.sha256 == hashlib.sha256(data).hexdigest()
    gets = [s for s in chaos_origin.seen_for("reset") if s.method == "GET"]
    assert len(gets) >= 4 + 2  # the resets were really retried, each from where it stopped


def test_lying_content_length_never_succeeds(chaos_origin: ChaosOrigin, tmp_path: Path) -> None:
    data = random_bytes(MiB, seed=33)
    url = chaos_origin.add("liar", Behaviour(data=data, lie_length=len(data) + 5000))
    with pytest.raises((TransferError, IntegrityError)):
        download(url, tmp_path / "l.part", TransferOptions(retry=FAST))


def test_expected_size_mismatch_is_integrity_error(nginx_origin: NginxOrigin, random_file, tmp_path: Path) -> None:
    random_file(nginx_origin.data_dir / "sized.bin", 1000, seed=34)
    with pytest.raises(IntegrityError):
        download(nginx_origin.url("sized.bin"), tmp_path / "s.part", TransferOptions(expected_size=999))


def test_etag_changing_per_request_falls_back_to_whole_file(chaos_origin: ChaosOrigin, tmp_path: Path) -> None:
    data = random_bytes(3 * MiB + 5, seed=35)
    url = chaos_origin.add("shifty", Behaviour(data=data, changing_etag=True))
    r = download(url, tmp_path / "e.part", TransferOptions(connections=4))
    assert r.sha256 == hashlib.sha256(data).hexdigest()


def test_cross_host_redirect_drops_credentials(chaos_origin: ChaosOrigin, tmp_path: Path) -> None:
    data = random_bytes(2 * MiB + 1, seed=36)
    chaos_origin.add("target", Behaviour(data=data))
    other_host = chaos_origin.url("target", host="127.0.0.2")
    url = chaos_origin.add("hop", Behaviour(redirect_to=other_host))
    headers = {"Authorization": "Bearer hop-secret", "Cookie": "session=abc", "X-Plain": "kept"}
    r = download(url, tmp_path / "d.part", TransferOptions(headers=headers))
    assert r.sha256 == hashlib.sha256(data).hexdigest()
    assert all(s.headers.get("Authorization") == "Bearer hop-secret" for s in chaos_origin.seen_for("hop"))
    arrived = chaos_origin.seen_for("target")
    assert arrived and all(s.host.startswith("127.0.0.2") for s in arrived)
    assert all("Authorization" not in s.headers and "Cookie" not in s.headers for s in arrived)
    assert all(s.headers.get("X-Plain") == "kept" for s in arrived)


CREDENTIALS = {"Authorization": "Bearer hop-secret", "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0",
               "Cookie": "session=abc", "X-Api-Key": "key-secret", "X-Amz-Security-Token": "sts-session-secret"}


@pytest.mark.parametrize("client", ["engine", "source"])
def test_cross_origin_redirect_drops_every_credential_header(chaos_origin: ChaosOrigin, tmp_path: Path,
                                                             client: str) -> None:
    """The engine and the sources' metadata requests follow one redirect policy: a hop to another
    origin carries none of the credential headers (an S3 session token included), the rest is kept."""
    data = random_bytes(300_000, seed=38)
    chaos_origin.add(f"cred-target-{client}", Behaviour(data=data))
    url = chaos_origin.add(f"cred-hop-{client}",
                           Behaviour(redirect_to=chaos_origin.url(f"cred-target-{client}", host="127.0.0.2")))
    headers = {**CREDENTIALS, "X-Plain": "kept"}
    if client == "engine":
        assert download(url, tmp_path / "c.part", TransferOptions(headers=headers)).sha256 == \
            hashlib.sha256(data).hexdigest()
    else:
        answer = request(url, headers)
        assert answer.status == 200 and answer.body == data and "127.0.0.2" in answer.url
    hops = chaos_origin.seen_for(f"cred-hop-{client}")
    assert hops and all(s.headers.get(k) == v for s in hops for k, v in CREDENTIALS.items())
    arrived = chaos_origin.seen_for(f"cred-target-{client}")
    assert arrived and all(s.host.startswith("127.0.0.2") for s in arrived)
    for s in arrived:
        assert not {k.lower() for k in s.headers} & {k.lower() for k in CREDENTIALS}, s.headers
        assert s.headers.get("X-Plain") == "kept"


def test_same_host_redirect_keeps_credentials(chaos_origin: ChaosOrigin, tmp_path: Path) -> None:
    data = random_bytes(100_000, seed=37)
    chaos_origin.add("target2", Behaviour(data=data))
    url = chaos_origin.add("hop2", Behaviour(redirect_to=chaos_origin.url("target2")))
    download(url, tmp_path / "d.part", TransferOptions(headers={"Authorization": "Bearer same"}))
    assert all(s.headers.get("Authorization") == "Bearer same" for s in chaos_origin.seen_for("target2"))


def test_secrets_never_in_errors_or_logs(nginx_origin: NginxOrigin, tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    url = nginx_origin.url("s503/model.bin?token=QUERYSECRET123&x=1")
    opts = TransferOptions(retry=FAST, headers={"Authorization": "Bearer HEADERSECRET456"})
    with pytest.raises(TransferError) as ei:
        download(url, tmp_path / "x.part", opts)
    dead = "http://user:PASSSECRET789@127.0.0.1:1/x?api_key=KEYSECRET000"
    with pytest.raises(TransferError) as ei2:
        download(dead, tmp_path / "y.part", TransferOptions(retry=RetryPolicy(attempts=2, backoff_base=0.01)))
    text = " ".join([str(ei.value), repr(ei.value), str(ei2.value), repr(ei2.value), caplog.text])
    assert "s503/model.bin" in str(ei.value)
    for secret in ("QUERYSECRET123", "HEADERSECRET456", "PASSSECRET789", "KEYSECRET000"):
        assert secret not in text


def test_idle_read_timeout_is_retried_then_fails(chaos_origin: ChaosOrigin, tmp_path: Path) -> None:
    data = random_bytes(256 * 1024, seed=38)
    url = chaos_origin.add("stall", Behaviour(data=data, stall_after=0))  # headers, then silence
    t0 = time.monotonic()
    with pytest.raises(TransferError) as ei:
        download(url, tmp_path / "t.part",
                 TransferOptions(read_timeout=0.3, retry=RetryPolicy(attempts=2, backoff_base=0.01)))
    assert "idle" in ei.value.reason
    assert time.monotonic() - t0 < 5


def test_parse_retry_after() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("nonsense") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    policy = RetryPolicy(backoff_base=1.0, backoff_max=4.0, retry_after_max=30.0)
    assert policy.delay(1, "3600") == 30.0
    assert all(0 <= policy.backoff(k) <= 4.0 for k in range(1, 10))
    assert policy.can_retry(5) and not policy.can_retry(6)
