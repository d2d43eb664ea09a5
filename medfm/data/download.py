"""Resumable, verified downloads for ``medfm data fetch``.

A file is downloaded into ``NAME.part`` beside its destination; an interrupted download resumes from the
bytes already there (an HTTP ``Range`` request; a server that ignores it restarts the file), and only a file
whose size and checksum match is renamed to its final name, so a partial download is never taken for a
complete one. Sources that publish no checksum get their SHA-256 recorded on the first download
(``NAME.sha256``) and checked on every later one. MONAI's and torchvision's ``download_url`` verify but do not
resume, which matters for the multi-gigabyte Decathlon archives.
"""

from __future__ import annotations

import hashlib
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path

from medfm.atomic import write_text
from medfm.progress import progress_bar

from .errors import DataError

CHUNK = 1 << 20


class FetchError(DataError):
    """A download that failed or did not verify: the message says what, and where a manual copy goes."""


def file_hash(path: str | os.PathLike, kind: str = "sha256") -> str:
    h = hashlib.new(kind)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: str | os.PathLike, md5: str | None = None, sha256: str | None = None, size: int | None = None) -> str:
    """Checks ``path`` against what is known of it and returns its SHA-256; raises :class:`FetchError` naming the
    file, what was expected and what was found."""
    path = Path(path)
    if size is not None and path.stat().st_size != size:
        raise FetchError(f"{path}: {path.stat().st_size:,} bytes, expected {size:,}")
    if md5 and (found := file_hash(path, "md5")) != md5.lower():
        raise FetchError(f"{path}: MD5 {found} does not match the published {md5}")
    found = file_hash(path)
    if sha256 and found != sha256.lower():
        raise FetchError(f"{path}: SHA-256 {found} does not match the expected {sha256}")
    return found


def download(url: str, dest: str | os.PathLike, md5: str | None = None, sha256: str | None = None,
             size: int | None = None, progress: bool = True, timeout: float = 30.0) -> Path:
    """``url`` into ``dest`` (resuming ``dest.part``), verified; a verified ``dest`` already there is kept
    (no request is made). Returns ``dest``."""
    dest = Path(dest)
    recorded = dest.with_name(dest.name + ".sha256")
    if dest.exists():
        _check(dest, md5, sha256, size, recorded)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    total = size
    request = urllib.request.Request(url, headers={"User-Agent": "medfm", **({"Range": f"bytes={have}-"} if have else {})})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the range starts at the end: the .part is already whole
            response = None
        else:
            raise FetchError(f"{url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, socket.timeout, OSError) as e:
        reason = getattr(e, "reason", e)
        raise FetchError(f"{url}: cannot connect ({reason}): offline, or the address is blocked") from e
    if response is not None:
        with response:
            if have and response.status != 206:  # the server ignored the range: start again
                have = 0
            total = response.headers.get("Content-Length")
            total = have + int(total) if total is not None else size
            bar = progress_bar(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                               desc=f"downloading {dest.name}", disable=not progress)
            try:
                with open(part, "ab" if have else "wb") as f:
                    while True:
                        try:
                            block = response.read(CHUNK)
                        except (socket.timeout, OSError) as e:
                            raise FetchError(f"{url}: the download broke off after {f.tell():,} bytes ({e}); run the "
                                             f"same command again to resume from {part}") from e
                        if not block:
                            break
                        f.write(block)
                        bar.update(len(block))
            finally:
                bar.close()
    got = part.stat().st_size
    if total is not None and got < total:
        raise FetchError(f"{url}: the server sent {got:,} of {total:,} bytes; run the same command again to resume "
                         f"from {part}")
    try:
        _check(part, md5, sha256, size, recorded, name=dest)
    except FetchError:
        part.unlink()  # a complete file that does not verify cannot be resumed into a good one
        raise
    os.replace(part, dest)
    return dest


def _check(path: Path, md5, sha256, size, recorded: Path, name: Path | None = None) -> None:
    """Published checksums first; without one, the SHA-256 recorded by the first download of ``name``."""
    name = name or path
    if not (md5 or sha256) and recorded.exists():
        sha256 = recorded.read_text().split()[0]
    try:
        found = verify(path, md5=md5, sha256=sha256, size=size)
    except FetchError as e:
        raise FetchError(f"{name}: corrupt or not the published file: {str(e).split(': ', 1)[1]}") from None
    if not recorded.exists():
        write_text(recorded, f"{found}  {name.name}\n")
