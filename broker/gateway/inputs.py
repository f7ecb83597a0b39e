"""A job's input image as the gateway receives it, stored once (common/blobs.py) and named in
the job's params as `blob:<sha256>`.

Accepted forms: a blob reference already stored, base64 (a `data:image/...;base64,` URL or
bare), an http(s) URL only where `inputs.allow_urls` (off by default: a server fetches no
arbitrary URL), a path only under `inputs.dir` (never an arbitrary server path). The size is
checked here; that it decodes as an image within the pixel limit, by the broker, before
anything is queued. A pipeline that takes no image refuses one (422), never running the job
as text-to-X instead.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import time
import urllib.parse

from ...common.blobs import BLOB_REF, BlobStore, decode_base64, read_under
from ...common.config import Config
from ...common.errors import InvalidParams

_BASE64 = re.compile(r"^[A-Za-z0-9+/=\s]{64,}$")  # bare base64 (a path has a dot or is short)
# LightX2V's "1.png,2.png": images split at commas, a data URL's own comma kept (a URL with a
# comma of its own writes it as %2C)
_IMAGES = re.compile(r"\s*(data:[^,]*,[^,]*|[^,]+)")


class Inputs:
    def __init__(self, config: Config, store, images_per_job: int | None, pipeline: str):
        """`images_per_job`: how many input images a job may name (0: a text-only pipeline);
        None for a pipeline without a params schema (no model family), whose params pass
        unchecked."""
        self.settings = config.inputs
        self.blobs = BlobStore(store, config.inputs.ttl_s)
        self.images_per_job = images_per_job
        self.pipeline = pipeline

    @property
    def takes_images(self) -> bool | None:
        return None if self.images_per_job is None else self.images_per_job > 0

    def refuse_image(self, field: str) -> None:
        if not self.takes_images:
            raise InvalidParams(f"{field}: pipeline {self.pipeline!r} takes no image (it is "
                                "text-only); send image-conditioned jobs to an image-to-X "
                                "pipeline (for example family wan2.1-i2v or qwen-image-edit)")

    def store(self, value, field: str = "image") -> str | list[str]:
        """`value` stored (blocking: call in a thread): its blob reference, or a list of them
        for a list, or for LightX2V's comma-separated images, where the pipeline takes
        several. A reference already stored is passed on: the broker checks each at its door."""
        self.refuse_image(field)
        if isinstance(value, str):
            parts = _IMAGES.findall(value) if "," in value else [value]
            if len(parts) == 1:
                return self._store_one(value, field)
            several = [part.strip() for part in parts]
        elif isinstance(value, list) and all(isinstance(item, str) for item in value):
            several = value
        else:
            raise InvalidParams(f"{field}: expected an image (a string) or a list of them")
        most = self.images_per_job or 0
        if most < 2:
            raise InvalidParams(f"{field}: one image per job, as a string (a list, or "
                                "several comma-separated, is a multi-image edit, which this "
                                "deployment does not serve; family qwen-image-edit-plus does)")
        if not 1 <= len(several) <= most:
            raise InvalidParams(f"{field}: {len(several)} images; a job takes 1 to {most}")
        return [self._store_one(item, f"{field}[{i}]") for i, item in enumerate(several)]

    def _store_one(self, value: str, field: str) -> str:
        if BLOB_REF.match(value):
            return value
        if value.startswith(("http://", "https://")):
            data = self._fetch(value, field)
        elif value.startswith("data:") or _BASE64.match(value):
            data = decode_base64(value, field)
        else:
            data = read_under(self.settings.dir, value, field)
        return self.store_bytes(data, field)

    def store_bytes(self, data: bytes, field: str = "image") -> str:
        """An uploaded file, stored: its blob reference. Only its size is checked here; the
        broker decodes it once, at its door, for every way a job comes in."""
        self.refuse_image(field)
        if len(data) > self.settings.max_bytes:
            raise InvalidParams(f"{field}: {len(data)} bytes > the limit of "
                                f"{self.settings.max_bytes}")
        return self.blobs.put(data)

    def _fetch(self, url: str, field: str) -> bytes:
        """GET `url` where the operator allows it: a listed host, or else one whose every
        address is public; no redirects (each would need the same check); at most
        `max_bytes`, within `url_timeout_s` in all."""
        import httpx

        if not self.settings.allow_urls:
            raise InvalidParams(f"{field}: URLs are off on this deployment (inputs.allow_urls); "
                                "send the image itself (base64 or a multipart upload)")
        address = self._check_host(url, field)
        request_url, headers, extensions = pinned(url, address) if address else (url, {}, {})
        limit, timeout_s = self.settings.max_bytes, self.settings.url_timeout_s
        deadline = time.monotonic() + timeout_s
        try:
            with httpx.Client(timeout=timeout_s, follow_redirects=False) as client, \
                    client.stream("GET", request_url, headers=headers,
                                  extensions=extensions) as response:
                response.raise_for_status()
                chunks, size = [], 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > limit:
                        raise InvalidParams(f"{field}: {url} is over {limit} bytes")
                    if time.monotonic() > deadline:
                        raise InvalidParams(f"{field}: {url} took over {timeout_s:g} s")
                    chunks.append(chunk)
        except httpx.HTTPError as exc:
            raise InvalidParams(f"{field}: could not fetch {url}: {exc}") from None
        return b"".join(chunks)

    def _check_host(self, url: str, field: str) -> str | None:
        """None for a listed host; else the public address the fetch must connect to (every
        address the name resolves to is public)."""
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        if self.settings.url_hosts:
            if host not in self.settings.url_hosts:
                raise InvalidParams(f"{field}: {host!r} is not one of the hosts this deployment "
                                    f"fetches from (inputs.url_hosts)")
            return None
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            found = list(dict.fromkeys(info[4][0] for info in socket.getaddrinfo(
                host, port, proto=socket.IPPROTO_TCP)))
        except (OSError, ValueError) as exc:
            raise InvalidParams(f"{field}: cannot resolve {host!r}: {exc}") from None
        inner = sorted(a for a in found if not is_public(a))
        if inner or not found:
            raise InvalidParams(f"{field}: {host!r} is a non-public address "
                                f"({inner[0] if inner else 'none found'}); only "
                                "hosts listed in inputs.url_hosts may be internal")
        return found[0]


def _ip(address: str):
    """getaddrinfo's address as an ip_address (an IPv6 zone, "%eth0", dropped)."""
    return ipaddress.ip_address(address.split("%")[0])


def is_public(address: str) -> bool:
    return _ip(address).is_global


def pinned(url: str, address: str) -> tuple[str, dict[str, str], dict[str, str]]:
    """`url` sent to `address`, the one the check approved, rather than to whatever its name
    resolves to when the fetch connects (a DNS server answering differently the second time
    would get past the check): (URL, headers, httpx extensions). The Host header and the
    TLS server name (checked against the certificate) stay the URL's own."""
    parts = urllib.parse.urlsplit(url)
    ip = _ip(address)
    userinfo, _, hostport = parts.netloc.rpartition("@")
    netloc = (f"{userinfo}@" if userinfo else "") + (f"[{ip}]" if ip.version == 6 else str(ip))
    if parts.port:
        netloc += f":{parts.port}"
    extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
    return (urllib.parse.urlunsplit(parts._replace(netloc=netloc)), {"Host": hostport},
            extensions)
