"""Which sources a fetch may read: an allow-list of URI prefixes.

Under Airflow, whoever may trigger a run can type a source URI. Without a limit the
fetch would copy whatever the worker reaches into the store: ``/etc/passwd``,
``http://169.254.169.254/latest/meta-data/``, another team's bucket. An
:class:`AllowedSources` is that limit; the fetch checks it before it reads a byte,
and every refusal names the setting the list comes from.

- A local path or ``file://`` URI must lie under a local prefix, both resolved first
  (``..`` and symbolic links), so neither ``landing/{partition}/../../etc/passwd``
  nor a link in the landing folder leads out of it.
- A URL must have a prefix's scheme, host and port, and its path (percent-decoded,
  ``..`` resolved) must lie under the prefix's path segment by segment:
  ``s3://landing/housing`` allows ``s3://landing/housing/2026-11-25.csv``, not
  ``s3://landing/housing-old/...``. A prefix of a scheme alone (``https://``) allows
  every host of that scheme.
- An HTTP(S) connection goes to public addresses only, unless the prefix that allows
  the URL names its host (``http://10.0.0.7:8080/``, ``http://localhost:8000/``); a
  link-local address (169.254.0.0/16, fe80::/10, where clouds serve instance
  credentials) needs a prefix that names that very address. Addresses are checked
  where the socket connects, for every redirect too, so that a name that resolves
  elsewhere the second time (DNS rebinding) gains nothing; a redirect must stay on
  the allowed prefixes.
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import os
import posixpath
import socket
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tfjobs.storage.store import redact

DEFAULT_PORTS = {"http": 80, "https": 443}


class SourceNotAllowedError(ValueError):
    """The source is outside the allowed prefixes; nothing of it was read."""


@dataclass(frozen=True)
class AllowedSources:
    """URI prefixes a fetch may read from, and ``setting``: where they are configured (named in refusals)."""

    prefixes: tuple[str, ...]
    setting: str = "the allowed source prefixes"

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefixes", tuple(dict.fromkeys(p.strip() for p in self.prefixes if p and p.strip())))

    @classmethod
    def parse(cls, text: str, setting: str, always: tuple[str, ...] = ()) -> AllowedSources:
        """``always`` and the prefixes in ``text``, separated by commas or whitespace."""
        return cls((*always, *text.replace(",", " ").split()), setting)

    def including(self, *prefixes: str) -> AllowedSources:
        return AllowedSources((*self.prefixes, *prefixes), self.setting)

    def check(self, uri: str) -> None:
        """Refuse ``uri`` unless it lies under a prefix."""
        if not self._allowing(uri):
            raise self._refusal(uri, "is not under any allowed source prefix")

    def check_address(self, url: str, address: str) -> None:
        """Refuse connecting to ``address`` for ``url`` unless it is public, or an allowing prefix names the host."""
        ip = ipaddress.ip_address(address.split("%")[0])
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        if ip.is_global and not ip.is_multicast:
            return
        named = [prefix for prefix in self._allowing(url) if _url_parts(prefix)[1]]
        if ip.is_link_local:
            named = [prefix for prefix in named if _is_address(_url_parts(prefix)[1], ip)]
        if not named:
            kind = "link-local" if ip.is_link_local else "loopback" if ip.is_loopback else "non-public"
            raise self._refusal(url, f"resolves to {ip}, a {kind} address that no allowed source prefix names")

    def url_handlers(self) -> list[urllib.request.BaseHandler]:
        """urllib handlers that check every request (redirects too) and every address it connects to."""
        return [_CheckedHTTPHandler(self), _CheckedHTTPSHandler(self)]

    def _allowing(self, uri: str) -> list[str]:
        local = _local_path(uri)
        if local is not None:
            return [p for p in self.prefixes if (lp := _local_path(p)) is not None and local.is_relative_to(lp)]
        try:
            scheme, host, port, path = _url_parts(uri)
        except ValueError:  # an unparsable port, say
            return []
        allowing = []
        for prefix in self.prefixes:
            if _local_path(prefix) is not None:
                continue
            p_scheme, p_host, p_port, p_path = _url_parts(prefix)
            same_place = scheme == p_scheme and (not p_host or (host, port) == (p_host, p_port))
            if same_place and (path == p_path or path.startswith(p_path.rstrip("/") + "/")):
                allowing.append(prefix)
        return allowing

    def _refusal(self, uri: str, why: str) -> SourceNotAllowedError:
        return SourceNotAllowedError(
            f"The source {redact(uri)} {why}, so nothing was read from it. Allowed: "
            f"{', '.join(self.prefixes) or 'nothing'}. If it is meant to be fetched, add its prefix to {self.setting}."
        )

    def _connect(self, url: str, address, timeout, source_address=None, **kwargs) -> socket.socket:
        """``socket.create_connection`` for ``url``: every address the host resolves to is checked first."""
        host, port = address
        target = urllib.parse.urlsplit(url).hostname or host
        resolved = list(dict.fromkeys(info[4][0] for info in socket.getaddrinfo(target, port, type=socket.SOCK_STREAM)))
        for ip in resolved:
            self.check_address(url, ip)
        if host.lower() != target:  # the environment's proxy, which resolves the name itself: checked here at least
            return socket.create_connection(address, timeout, source_address, **kwargs)
        error: OSError | None = None
        for ip in resolved:  # connect to the checked addresses, not to the name again
            try:
                return socket.create_connection((ip, port), timeout, source_address, **kwargs)
            except OSError as err:
                error = err
        raise error or OSError(f"{host} resolves to no address")

    def _connection_class(self, base: type[http.client.HTTPConnection], url: str):
        def connection(host, **kwargs):
            made = base(host, **kwargs)
            made._create_connection = functools.partial(self._connect, url)  # what connect() calls
            return made

        return connection


class _CheckedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, allowed: AllowedSources) -> None:
        super().__init__()
        self.allowed = allowed

    def http_request(self, req):
        self.allowed.check(req.full_url)
        return super().http_request(req)

    def http_open(self, req):
        return self.do_open(self.allowed._connection_class(http.client.HTTPConnection, req.full_url), req)

    def ftp_request(self, req):  # urllib follows redirects to ftp:// too
        self.allowed.check(req.full_url)
        return req


class _CheckedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, allowed: AllowedSources) -> None:
        super().__init__()
        self.allowed = allowed

    def https_request(self, req):
        self.allowed.check(req.full_url)
        return super().https_request(req)

    def https_open(self, req):
        return self.do_open(self.allowed._connection_class(http.client.HTTPSConnection, req.full_url), req,
                            context=self._context)


def _local_path(uri: str) -> Path | None:
    """The resolved local path of a path or ``file://`` URI; None for other URIs."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme == "file":
        return Path(os.path.realpath(urllib.parse.unquote(parts.path)))
    if not parts.scheme or len(parts.scheme) == 1:  # a plain path (or a Windows drive letter)
        return Path(os.path.realpath(uri))
    return None


def _url_parts(uri: str) -> tuple[str, str, int | None, str]:
    """Scheme, host (for s3: the bucket), port and normalized path (percent-decoded, ``..`` resolved)."""
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.lower()
    path = posixpath.normpath("/" + urllib.parse.unquote(parts.path).lstrip("/"))
    return scheme, (parts.hostname or "").lower(), parts.port or DEFAULT_PORTS.get(scheme), path


def _is_address(host: str, ip) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")) == ip
    except ValueError:
        return False
