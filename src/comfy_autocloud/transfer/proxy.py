"""Which HTTP proxy a request goes through, read from the environment the way curl and requests do.

`AUTOCLOUD_PROXY` overrides the standard variables (`none`/`off`/`direct` turns proxies off for
AutoCloud only); otherwise `http_proxy`/`HTTP_PROXY` for http URLs, `https_proxy`/`HTTPS_PROXY` for
https, `all_proxy`/`ALL_PROXY` for both (lower case wins, as in curl). `no_proxy`/`NO_PROXY` lists
hosts reached directly: `*`, `host`, `.domain` or `domain` (and its subdomains), `host:port`, an IP
or a CIDR range. Credentials in a proxy URL travel as a Proxy-Authorization header to the proxy only
and are shown as `***` wherever the proxy is named.
"""

from __future__ import annotations

import base64
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from comfy_autocloud.errors import ManifestError
from comfy_autocloud.redact import redact_url

OFF = ("none", "off", "direct", "false", "0")
SUPPORTED_SCHEMES = ("http", "https")


@dataclass(frozen=True)
class Proxy:
    """A proxy to use for one URL: `url` has no credentials; `headers` carry them (to the proxy only)."""

    url: str
    variable: str  # where it came from (AUTOCLOUD_PROXY, https_proxy, ...)
    headers: Mapping[str, str] = field(default_factory=dict)
    secrets: tuple[str, ...] = ()

    def request_args(self, url: str, headers: Mapping[str, str]) -> tuple[dict[str, str], dict[str, Any]]:
        """(headers, aiohttp keyword arguments) for one request to `url` through this proxy: a plain http
        request carries Proxy-Authorization itself, an https one gives it to the CONNECT tunnel only."""
        if self.headers and urlsplit(url).scheme == "http":
            return {**headers, **self.headers}, {"proxy": self.url}
        return dict(headers), {"proxy": self.url, "proxy_headers": dict(self.headers) or None}

    @property
    def display(self) -> str:
        """The proxy as logs and errors show it: credentials masked."""
        return redact_url(self.url if not self.secrets else self.url.replace("://", "://***@", 1))


def _env(names: tuple[str, ...], env: Mapping[str, str]) -> tuple[str, str] | None:
    for name in names:
        value = env.get(name)
        if value is not None and value.strip():
            return name, value.strip()
    return None


def parse_proxy(value: str, variable: str) -> Proxy:
    """`[scheme://][user:password@]host[:port]` as a Proxy; a bare host:port means http:// (curl's rule)."""
    text = value if "://" in value else "http://" + value
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ManifestError(variable, f"{redact_url(text)}: not a proxy URL ({exc})") from None
    if parts.scheme.lower() not in SUPPORTED_SCHEMES:
        raise ManifestError(variable, f"{redact_url(text)}: {parts.scheme} proxies are not supported "
                                      f"(use an http:// or https:// proxy)")
    if not parts.hostname:
        raise ManifestError(variable, f"{redact_url(text)}: no host")
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    netloc = host + (f":{port}" if port else "")
    clean = urlunsplit((parts.scheme.lower(), netloc, "", "", ""))
    if parts.username is None:
        return Proxy(clean, variable)
    user, password = unquote(parts.username), unquote(parts.password or "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    secrets = tuple(s for s in (password, user, token) if s)
    return Proxy(clean, variable, {"Proxy-Authorization": f"Basic {token}"}, secrets)


def _bypass(host: str, port: int | None, no_proxy: str) -> bool:
    """curl's NO_PROXY rule (with requests' CIDR ranges)."""
    host = host.lower().rstrip(".").strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    for raw in no_proxy.replace(" ", ",").split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        if "/" in entry:
            try:
                if ip is not None and ip in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
            continue
        want_port = None
        if entry.count(":") == 1 or (entry.startswith("[") and "]:" in entry):
            entry, _, p = entry.rpartition(":")
            want_port = int(p) if p.isdigit() else None
        entry = entry.strip("[]").lstrip("*").lstrip(".").rstrip(".")
        if want_port is not None and want_port != port:
            continue
        if host == entry or (entry and host.endswith("." + entry)):
            return True
    return False


def proxy_for(url: str, env: Mapping[str, str] | None = None) -> Proxy | None:
    """The proxy for `url`, or None to connect directly; ManifestError if a proxy variable is malformed."""
    env = os.environ if env is None else env
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    override = _env(("AUTOCLOUD_PROXY",), env)
    if override is not None and override[1].lower() in OFF:
        return None
    chosen = override or _env((f"{scheme}_proxy", f"{scheme.upper()}_PROXY", "all_proxy", "ALL_PROXY"), env)
    if chosen is None:
        return None
    no_proxy = _env(("no_proxy", "NO_PROXY"), env)
    if no_proxy is not None and _bypass(parts.hostname, port, no_proxy[1]):
        return None
    return parse_proxy(chosen[1], chosen[0])


VARIABLES = ("AUTOCLOUD_PROXY", "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


def proxy_secrets(env: Mapping[str, str] | None = None) -> set[str]:
    """Credentials of every proxy variable that is set (masked in any error text that quotes them)."""
    env = os.environ if env is None else env
    out: set[str] = set()
    for name in VARIABLES:
        value = env.get(name, "").strip()
        if value and value.lower() not in OFF:
            try:
                out.update(parse_proxy(value, name).secrets)
            except ManifestError:
                continue
    return out


def describe(env: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """What `autocloud doctor` and the panel show: each scheme's proxy (redacted) and the NO_PROXY list."""
    env = os.environ if env is None else env
    out: dict[str, str | None] = {}
    for scheme in ("http", "https"):
        try:
            p = proxy_for(f"{scheme}://autocloud.invalid/", env)
        except ManifestError as exc:
            out[scheme] = f"error: {exc}"
            continue
        out[scheme] = None if p is None else f"{p.display} (from {p.variable})"
    no_proxy = _env(("no_proxy", "NO_PROXY"), env)
    out["no_proxy"] = no_proxy[1] if no_proxy else None
    return out
