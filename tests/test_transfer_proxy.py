"""Proxies as curl and requests use them (HTTP_PROXY/HTTPS_PROXY/NO_PROXY, AUTOCLOUD_PROXY overrides),
through a real tinyproxy on loopback; a proxy's credentials never show in errors."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from comfy_autocloud.errors import ManifestError, TransferError
from comfy_autocloud.transfer import RetryPolicy, TransferOptions, download, probe
from comfy_autocloud.transfer.proxy import VARIABLES, describe, proxy_for, proxy_secrets
from proxy_server import TinyProxy
from servers import NginxOrigin, free_port

MiB = 1 << 20
ONE_TRY = TransferOptions(retry=RetryPolicy(attempts=1), connect_timeout=5.0, read_timeout=10.0)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*VARIABLES, "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[TinyProxy]:
    if not TinyProxy.available():
        pytest.skip("tinyproxy is not on PATH (apt-get install -y tinyproxy)")
    proxy = TinyProxy(tmp_path / "proxy").start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def auth_proxy(tmp_path: Path) -> Iterator[TinyProxy]:
    if not TinyProxy.available():
        pytest.skip("tinyproxy is not on PATH (apt-get install -y tinyproxy)")
    proxy = TinyProxy(tmp_path / "auth-proxy", auth=("alice", "pr0xy-Secret-77")).start()
    try:
        yield proxy
    finally:
        proxy.stop()


# ---------------------------------------------------------------- which proxy (pure)
def test_scheme_variables_lower_case_first_and_all_proxy() -> None:
    env = {"HTTP_PROXY": "http://upper:3128", "http_proxy": "http://lower:3128", "ALL_PROXY": "all:8080"}
    assert proxy_for("http://example.com/a", env).url == "http://lower:3128"
    assert proxy_for("http://example.com/a", env).variable == "http_proxy"
    assert proxy_for("https://example.com/a", env).url == "http://all:8080"  # bare host:port is http://
    assert proxy_for("https://example.com/a", {}) is None
    assert proxy_for("file:///x", env) is None and proxy_for("s3://b/k", env) is None


@pytest.mark.parametrize(("no_proxy", "url", "direct"), [
    ("*", "http://anything.example/x", True),
    ("example.com", "http://example.com/x", True),
    ("example.com", "http://cdn.example.com/x", True),
    (".example.com", "http://cdn.example.com/x", True),
    ("example.com", "http://badexample.com/x", False),
    ("10.0.0.0/8, 192.168.1.5", "http://10.2.3.4/x", True),
    ("10.0.0.0/8, 192.168.1.5", "http://192.168.1.5:8080/x", True),
    ("10.0.0.0/8", "http://11.0.0.1/x", False),
    ("example.com:8080", "http://example.com:8080/x", True),
    ("example.com:8080", "http://example.com/x", False),
    ("", "http://example.com/x", False),
])
def test_no_proxy_rules(no_proxy: str, url: str, direct: bool) -> None:
    env = {"http_proxy": "http://proxy:3128", "NO_PROXY": no_proxy}
    assert (proxy_for(url, env) is None) is direct


def test_autocloud_proxy_overrides_and_can_turn_proxies_off() -> None:
    env = {"https_proxy": "http://corp:3128", "AUTOCLOUD_PROXY": "http://mine:8888"}
    assert proxy_for("https://huggingface.co/x", env).url == "http://mine:8888"
    assert proxy_for("https://huggingface.co/x", env).variable == "AUTOCLOUD_PROXY"
    assert proxy_for("https://huggingface.co/x", {**env, "AUTOCLOUD_PROXY": "none"}) is None
    assert proxy_for("https://internal/x", {**env, "NO_PROXY": "internal"}) is None


def test_credentials_go_to_a_header_and_are_masked() -> None:
    p = proxy_for("http://example.com/x", {"http_proxy": "http://bob:s%40cret-pw@proxy:3128"})
    assert p.url == "http://proxy:3128" and "cret" not in p.display and p.display == "http://***@proxy:3128"
    assert p.headers["Proxy-Authorization"].startswith("Basic ")
    assert "s@cret-pw" in p.secrets
    assert proxy_secrets({"http_proxy": "http://bob:s%40cret-pw@proxy:3128"}) >= {"s@cret-pw", "bob"}
    shown = describe({"http_proxy": "http://bob:s%40cret-pw@proxy:3128", "NO_PROXY": "localhost"})
    assert shown == {"http": "http://***@proxy:3128 (from http_proxy)", "https": None, "no_proxy": "localhost"}


def test_unsupported_or_malformed_proxy_is_named() -> None:
    with pytest.raises(ManifestError, match=r"HTTPS_PROXY.*socks5 proxies are not supported"):
        proxy_for("https://example.com/x", {"HTTPS_PROXY": "socks5://user:pw123456@h:1080"})
    with pytest.raises(ManifestError) as info:
        proxy_for("http://example.com/x", {"AUTOCLOUD_PROXY": "http://user:pw123456@h:notaport"})
    assert "AUTOCLOUD_PROXY" in str(info.value) and "pw123456" not in str(info.value)
    assert describe({"HTTPS_PROXY": "socks5://h:1080"})["https"].startswith("error: HTTPS_PROXY")


# ---------------------------------------------------------------- through a real proxy
def test_download_goes_through_http_proxy(nginx_origin: NginxOrigin, random_file, tinyproxy: TinyProxy,
                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    want = random_file(nginx_origin.data_dir / "via-proxy.bin", 6 * MiB + 7, seed=41)
    monkeypatch.setenv("HTTP_PROXY", tinyproxy.url())
    url = nginx_origin.url("via-proxy.bin")
    r = download(url, tmp_path / "a.part", TransferOptions(connections=3))
    assert r.sha256 == want == hashlib.sha256((tmp_path / "a.part").read_bytes()).hexdigest()
    seen = [line for line in tinyproxy.proxied() if "/via-proxy.bin" in line]
    assert len(seen) >= 3, tinyproxy.proxied()  # the probe and every range went through the proxy
    assert all(line.startswith(("GET http://127.0.0.1", "HEAD http://127.0.0.1")) for line in seen)
    assert probe(url, ONE_TRY).size == 6 * MiB + 7


def test_no_proxy_connects_directly(nginx_origin: NginxOrigin, random_file, tinyproxy: TinyProxy,
                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    want = random_file(nginx_origin.data_dir / "direct.bin", MiB, seed=42)
    monkeypatch.setenv("http_proxy", tinyproxy.url())
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    assert download(nginx_origin.url("direct.bin"), tmp_path / "d.part", ONE_TRY).sha256 == want
    assert not [line for line in tinyproxy.proxied() if "direct.bin" in line]


def test_autocloud_proxy_beats_a_dead_environment_proxy(nginx_origin: NginxOrigin, random_file,
                                                        tinyproxy: TinyProxy, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    want = random_file(nginx_origin.data_dir / "override.bin", MiB, seed=43)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AUTOCLOUD_PROXY", tinyproxy.url())
    assert download(nginx_origin.url("override.bin"), tmp_path / "o.part", ONE_TRY).sha256 == want
    assert [line for line in tinyproxy.proxied() if "override.bin" in line]
    monkeypatch.setenv("AUTOCLOUD_PROXY", "off")  # AutoCloud alone goes direct, the dead one is ignored
    assert download(nginx_origin.url("override.bin"), tmp_path / "p.part", ONE_TRY).sha256 == want


def test_proxy_with_credentials(nginx_origin: NginxOrigin, random_file, auth_proxy: TinyProxy, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    want = random_file(nginx_origin.data_dir / "auth.bin", 2 * MiB, seed=44)
    monkeypatch.setenv("HTTP_PROXY", auth_proxy.url())
    assert download(nginx_origin.url("auth.bin"), tmp_path / "ok.part", ONE_TRY).sha256 == want
    assert [line for line in auth_proxy.proxied() if "auth.bin" in line]

    monkeypatch.setenv("HTTP_PROXY", auth_proxy.url(with_auth=False))  # the proxy answers 407
    with pytest.raises(TransferError, match="407"):
        download(nginx_origin.url("auth.bin"), tmp_path / "no.part", ONE_TRY)


def test_unreachable_proxy_error_names_it_without_the_password(nginx_origin: NginxOrigin, random_file,
                                                               tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    random_file(nginx_origin.data_dir / "dead.bin", 1024, seed=45)
    port = free_port()
    monkeypatch.setenv("HTTP_PROXY", f"http://alice:pr0xy-Secret-77@127.0.0.1:{port}")
    with pytest.raises(TransferError) as info:
        download(nginx_origin.url("dead.bin"), tmp_path / "x.part", ONE_TRY)
    text = str(info.value)
    assert f"via proxy http://***@127.0.0.1:{port}" in text, text
    assert "pr0xy-Secret-77" not in text and "alice" not in text, text


def test_source_api_calls_use_the_same_proxy(nginx_origin: NginxOrigin, random_file, auth_proxy: TinyProxy,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Civitai/Hugging Face API calls (sources/_net.py) choose their proxy the same way as downloads."""
    from comfy_autocloud.sources._net import request

    random_file(nginx_origin.data_dir / "api.json", 100, seed=46)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")  # dead: AUTOCLOUD_PROXY wins
    monkeypatch.setenv("AUTOCLOUD_PROXY", auth_proxy.url())
    answer = request(nginx_origin.url("api.json"), {})
    assert answer.status == 200 and len(answer.body) == 100
    assert [line for line in auth_proxy.proxied() if "/api.json" in line]
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    before = len(auth_proxy.proxied())
    assert request(nginx_origin.url("api.json"), {}).status == 200
    assert len(auth_proxy.proxied()) == before  # NO_PROXY: direct
