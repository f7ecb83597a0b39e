"""Input files (a job's conditioning image) stored once in Redis beside the jobs, so that they
reach the encode stage from any entry point with no shared storage.

    {ns}:blob:<sha256>   string   the file's bytes, expiring after `inputs.ttl_s`

A job names one in its params as `"image": "blob:<sha256 hex>"`. The gateway stores what a
client uploads (base64 in JSON, a multipart form, a server path under `inputs.dir`, a URL
where `inputs.allow_urls`); a client writing the ingress stream stores it itself (SET with an
expiry, docs/wire.md). The broker, the one door every submit passes, checks each reference:
stored, within `inputs.max_bytes`, decodes as an image within `inputs.max_pixels` (once per
stored image), so no stage ever sees a missing or bad input. Content-addressed: the same
image twice is one key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
from pathlib import Path

from .errors import InvalidParams
from .jobstore import _translate  # redis-py's errors as StoreUnavailable

BLOB_REF = re.compile(r"^blob:([0-9a-f]{64})$")
_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,", re.I)


def ref_of(data: bytes) -> str:
    return "blob:" + hashlib.sha256(data).hexdigest()


def check_image(data: bytes, *, max_bytes: int, max_pixels: int, field: str = "image") -> None:
    """InvalidParams unless `data` is an image within the limits (read from its header and
    then decoded in full, so a truncated or hostile file is refused here)."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > max_bytes:
        raise InvalidParams(f"{field}: {len(data)} bytes > the limit of {max_bytes}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidParams(f"{field}: {width}x{height} pixels > the limit of "
                                    f"{max_pixels}")
            image.load()
    except InvalidParams:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidParams(f"{field}: not an image ({type(exc).__name__}: "
                            f"{str(exc)[:200]})") from None


def decode_base64(text: str, field: str = "image") -> bytes:
    """The bytes of a data URL (`data:image/png;base64,...`) or of bare base64."""
    body = _DATA_URL.sub("", text.strip(), count=1)
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidParams(f"{field}: neither a blob reference nor base64 image data") from None


def read_under(root: str, path: str, field: str = "image_path") -> bytes:
    """A server-side file, only under `root` (inputs.dir): never an arbitrary path."""
    if not root:
        raise InvalidParams(f"{field}: server paths are off (no inputs.dir configured); send "
                            "the image itself (base64 or a multipart upload)")
    base = Path(root).resolve()
    target = (base / path).resolve()
    if not target.is_relative_to(base) or not target.is_file():
        raise InvalidParams(f"{field}: {path!r} is not a file under the input directory")
    return target.read_bytes()


class BlobStore:
    """Blobs of one namespace: `put` (content-addressed, with a TTL), `get`, `exists`."""

    def __init__(self, store, ttl_s: float):
        self.redis = store.redis
        self.prefix = store.keys.prefix + "blob:"
        self.ttl_ms = int(ttl_s * 1000)
        self._checked: set[str] = set()

    def key(self, ref: str) -> str:
        match = BLOB_REF.match(ref)
        if not match:
            raise InvalidParams(f"{ref[:80]!r} is not a blob reference (blob:<sha256 hex>)")
        return self.prefix + match.group(1)

    @_translate
    def put(self, data: bytes) -> str:
        ref = ref_of(data)
        self.redis.set(self.key(ref), data, px=self.ttl_ms)
        return ref

    @_translate
    def get(self, ref: str) -> bytes:
        data = self.redis.get(self.key(ref))
        if data is None:
            raise InvalidParams(f"{ref}: no such input (never stored, or expired)")
        return data

    @_translate
    def exists(self, ref: str) -> bool:
        return bool(self.redis.exists(self.key(ref)))

    def check(self, ref: str, settings) -> None:
        """The broker's door: `ref` names a stored input that is an image within the limits
        (settings: config.inputs). Content-addressed, so one checked ref stays good while it
        exists; those are remembered (a bounded set)."""
        if ref in self._checked and self.exists(ref):
            return
        check_image(self.get(ref), max_bytes=settings.max_bytes,
                    max_pixels=settings.max_pixels)
        if len(self._checked) >= 10_000:
            self._checked.clear()
        self._checked.add(ref)
