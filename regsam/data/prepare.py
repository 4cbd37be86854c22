"""Turn a user's download of a public lung-CT dataset into regsam case folders.

``prepare_dataset("dirlab4dct", root, out)`` checks the download under ``root``
against the dataset's manifest (:mod:`regsam.data.manifests`) and writes one case
folder per image pair (``out/dirlab4dct_case01``, ``out/copdgene_copd03``,
``out/nlst_0001`` ...) in the regsam case format (:mod:`regsam.data.case`).

Fixed and moving image of each case:

* DIR-Lab 4DCT: fixed = T00 (maximum inhale), moving = T50 (maximum exhale).
* DIR-Lab COPDgene: fixed = iBH (inspiration breath-hold), moving = eBH (expiration).
* Learn2Reg NLST: fixed = ``NLST_XXXX_0000`` (baseline), moving = ``NLST_XXXX_0001`` (follow-up).

Everything requested is validated before anything is written: every expected file
present, raw images exactly ``prod(size) * 2`` bytes, sha256 where the manifest
knows it, landmark files parse with the expected count (300 for DIR-Lab) and lie
inside their image. The first problem raises :class:`~regsam.errors.InputError`
with one line naming the dataset, the case and the file. Each case folder is then
written atomically, so a failed run leaves no partial folder.

Geometry (mm, world LPS as SimpleITK reports it): DIR-Lab raw images get the
manifest's spacing, origin 0 and direction ``diag(1, 1, -1)`` (DIR-Lab stores
slices superior to inferior), intensities become HU (stored value - 1024). DIR-Lab
landmarks are 1-based voxel indices and NLST keypoints 0-based voxel indices; both
are converted to mm with the geometry of the image they belong to.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import SimpleITK as sitk

import regsam
from regsam.data.case import Case, write_case
from regsam.data.fetch import sha256_file
from regsam.data.manifests import find_case, load_manifest
from regsam.errors import InputError
from regsam.io.images import read_image, read_raw_volume, same_grid
from regsam.io.landmarks import read_dirlab_xyz

#: numbers are compared to the manifest's spacing with this tolerance (mm)
SPACING_TOLERANCE_MM = 1e-3
#: a landmark may sit this far (voxels) outside the outermost voxel centres before it is rejected
BOUNDS_TOLERANCE_VOX = 0.5


def prepare_dataset(
    name: str,
    root: str | os.PathLike,
    out: str | os.PathLike,
    cases: Sequence[str] | None = None,
    manifest: dict | None = None,
) -> list[Case]:
    """Validate the download of dataset ``name`` under ``root`` and write its cases under ``out``.

    Args:
        name: ``dirlab4dct``, ``copdgene`` or ``nlst``.
        root: the folder the user unpacked the download into (searched recursively for
            DIR-Lab files; for NLST the folder holding ``NLST/`` or ``NLST/`` itself).
        out: folder receiving one case folder per pair, named ``{name}_{case id}``.
        cases: case ids to prepare (``3``, ``case3``, ``copd3``, ``0003`` ...). ``None`` or empty:
            every case found under ``root``; for NLST every pair that has keypoint files
            (the held-out validation pairs of some releases have none and are skipped).
        manifest: use this manifest dict instead of the shipped one (tests, private copies).

    Returns:
        The written cases, in manifest order.

    Raises:
        InputError: unknown dataset or case, missing/short/corrupt file, bad landmark file.
            Nothing is written when it is raised.
    """
    manifest = manifest if manifest is not None else load_manifest(name)
    root = Path(root).expanduser()
    out = Path(out).expanduser()
    if not root.is_dir():
        raise InputError(f"{name}: download folder not found: {root}")
    if out.exists() and not out.is_dir():
        raise InputError(f"{name}: output path exists and is not a folder: {out}")
    if manifest["kind"] == "dirlab_raw":
        plans: list[_Plan] = _plan_dirlab(manifest, root, cases)
    elif manifest["kind"] == "learn2reg":
        plans = _plan_learn2reg(manifest, root, cases)
    else:
        raise InputError(f"{name}: manifest kind '{manifest['kind']}' cannot be prepared")
    # Every requested case is valid at this point; only now does anything get written.
    return [plan.write(out) for plan in plans]


# ---------------------------------------------------------------- shared helpers
class _Plan:
    """A validated case, ready to be written."""

    def write(self, out: Path) -> Case:  # pragma: no cover - interface
        raise NotImplementedError


def _show(path: Path, root: Path) -> str:
    # Name files relative to --root: that is how the user knows them (and how the manifest lists them).
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _check_sha256(path: Path, expected: str | None, where: str, shown: str) -> None:
    if not expected:
        return
    digest = sha256_file(path)
    if digest.lower() != expected.lower():
        raise InputError(f"{where}: {shown} has sha256 {digest}, expected {expected} (corrupt or a different release?)")


def _check_bounds(index0: np.ndarray, size: Sequence[int], where: str, shown: str, base: int) -> None:
    """Reject points outside the image: a wrong-case or wrong-axis-order file shows up here."""
    upper = np.asarray(size, dtype=np.float64) - 1.0 + BOUNDS_TOLERANCE_VOX
    outside = np.nonzero(((index0 < -BOUNDS_TOLERANCE_VOX) | (index0 > upper)).any(axis=1))[0]
    if outside.size:
        i = int(outside[0])
        shown_index = " ".join(f"{v:g}" for v in index0[i] + base)
        dims = "x".join(str(int(s)) for s in size)
        raise InputError(
            f"{where}: {shown} point {i + 1} (voxel {shown_index}, {base}-based) lies outside the {dims} image"
            f" ({outside.size} point(s) outside; wrong case?)"
        )


def _index_to_world(image: sitk.Image, index0: np.ndarray) -> np.ndarray:
    """(N, 3) continuous 0-based voxel indices (x, y, z) -> (N, 3) world mm (LPS) of ``image``."""
    return np.array(
        [image.TransformContinuousIndexToPhysicalPoint([float(v) for v in row]) for row in index0], dtype=np.float64
    ).reshape(-1, 3)


def _identity_tre(fixed_mm: np.ndarray, moving_mm: np.ndarray) -> float:
    """Mean distance (mm) between corresponding points before registration."""
    return float(np.linalg.norm(fixed_mm - moving_mm, axis=1).mean()) if len(fixed_mm) else float("nan")


def _regsam_version() -> str:
    return getattr(regsam, "__version__", "unknown")


class _FileFinder:
    """Finds a distributed file under ``root``: first at its manifest path, else by name anywhere below.

    Name matching is case-insensitive because the archives are not consistent
    (``ExtremePhases`` vs ``extremePhases``, ``Case8Deploy`` inside ``Case8Pack.zip``).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._by_name: dict[str, list[Path]] | None = None

    def _index(self) -> dict[str, list[Path]]:
        if self._by_name is None:
            by_name: dict[str, list[Path]] = {}
            seen: set[tuple[int, int]] = set()
            for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
                stat = os.stat(dirpath)
                if (stat.st_dev, stat.st_ino) in seen:  # a symlink loop: do not walk it twice
                    dirnames[:] = []
                    continue
                seen.add((stat.st_dev, stat.st_ino))
                # Hidden folders include regsam's own temporary output folders; never pick files from them.
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for file_name in filenames:
                    by_name.setdefault(file_name.lower(), []).append(Path(dirpath) / file_name)
            self._by_name = by_name
        return self._by_name

    def find(self, relative: str, alternatives: Iterable[str] = ()) -> Path | None:
        exact = self.root / relative
        if exact.is_file():
            return exact
        for file_name in [PurePosixPath(relative).name, *alternatives]:
            hits = [p for p in self._index().get(file_name.lower(), []) if p.is_file()]
            if hits:
                # Several copies (an archive unpacked twice): take the shallowest, then alphabetical.
                return min(hits, key=lambda p: (len(p.relative_to(self.root).parts), str(p)))
        return None

    def missing(self, where: str, what: str, relative: str, alternatives: Sequence[str]) -> InputError:
        also = f"; also looked for {', '.join(alternatives)}" if alternatives else ""
        return InputError(
            f"{where}: missing {what} {PurePosixPath(relative).name} (expected at {relative}{also}"
            f" anywhere under {self.root})"
        )


# ---------------------------------------------------------------- DIR-Lab raw (4DCT, COPDgene)
def read_dirlab_index(path: Path) -> np.ndarray:
    """Parse a DIR-Lab ``*_xyz.txt`` / ``*_xyz_r1.txt`` file into an (N, 3) array of 1-based voxel indices.

    The files hold one landmark per line, ``x y z`` separated by tabs or spaces (CRLF line ends
    in the originals). Used to validate a file (count, bounds) with line-precise errors before
    anything is written; :func:`regsam.io.landmarks.read_dirlab_xyz` does the mm conversion.

    Raises:
        InputError: unreadable file, a line that is not three numbers.
    """
    return _read_index_triples(path, "landmark file", r"\s+", "x y z")


def _read_index_triples(path: Path, what: str, separators: str, layout: str) -> np.ndarray:
    """(N, 3) float64 voxel indices, one triple per non-blank line split on the regex ``separators``.

    Raises: InputError naming the file (and line) for an unreadable file or a line that is not three finite numbers.
    """
    try:
        text = path.read_text(encoding="latin-1")
    except OSError as exc:
        raise InputError(f"{path}: cannot read {what} ({exc.strerror})") from None
    rows: list[list[float]] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        fields = [f for f in re.split(separators, line.strip()) if f]
        if not fields:
            continue
        try:
            values = [float(v) for v in fields]
        except ValueError:
            values = []
        if len(values) != 3 or not np.isfinite(values).all():
            raise InputError(
                f"{path}:{line_no}: expected three numbers ({layout} voxel indices), got '{line.strip()[:60]}'"
            )
        rows.append(values)
    return np.array(rows, dtype=np.float64).reshape(-1, 3)


@dataclass
class _RawSide:
    role: str  # "fixed" or "moving"
    phase: str  # "T00", "T50", "iBH", "eBH"
    image: Path
    landmarks: Path
    index1: np.ndarray  # (N, 3) 1-based voxel indices as in the file


@dataclass
class _RawPlan(_Plan):
    manifest: dict
    entry: dict
    root: Path
    fixed: _RawSide
    moving: _RawSide

    def _read_image(self, path: Path) -> sitk.Image:
        fmt = self.manifest["image_format"]
        size = [int(s) for s in self.entry["size"]]
        spacing = [float(s) for s in self.entry["spacing"]]
        raw = read_raw_volume(path, size, spacing, dtype=fmt.get("dtype", "<i2"))
        data = sitk.GetArrayFromImage(raw)
        offset = int(fmt.get("hu_offset", 0))
        if offset:
            low, high = int(data.min()) + offset, int(data.max()) + offset
            info = np.iinfo(data.dtype)
            if info.min <= low and high <= info.max:
                data += np.asarray(offset, dtype=data.dtype)  # stays int16: real CT values fit
            else:
                data = data.astype(np.int32) + offset  # widen rather than wrap around
        image = sitk.GetImageFromArray(data)
        image.SetSpacing(spacing)
        image.SetOrigin([float(v) for v in fmt.get("origin_mm", (0.0, 0.0, 0.0))])
        image.SetDirection([float(v) for v in fmt.get("direction", (1, 0, 0, 0, 1, 0, 0, 0, 1))])
        return image

    def write(self, out: Path) -> Case:
        name, entry = self.manifest["name"], self.entry
        fixed_image = self._read_image(self.fixed.image)
        moving_image = self._read_image(self.moving.image)
        # 1-based DIR-Lab indices -> mm through each image's own geometry (spacing, origin, flipped z).
        fixed_points = read_dirlab_xyz(self.fixed.landmarks, fixed_image)
        moving_points = read_dirlab_xyz(self.moving.landmarks, moving_image)
        fmt = self.manifest["image_format"]
        pairing = self.manifest.get("pairing", {})
        meta = {
            "dataset": name,
            "case": entry["id"],
            "case_label": entry.get("label", entry["id"]),
            "description": self.manifest["description"],
            "citation": self.manifest["citation"],
            "url": self.manifest["url"],
            "fixed": {
                "phase": self.fixed.phase,
                "meaning": pairing.get("fixed", ""),
                "image": _show(self.fixed.image, self.root),
                "landmarks": _show(self.fixed.landmarks, self.root),
            },
            "moving": {
                "phase": self.moving.phase,
                "meaning": pairing.get("moving", ""),
                "image": _show(self.moving.image, self.root),
                "landmarks": _show(self.moving.landmarks, self.root),
            },
            "size": [int(s) for s in entry["size"]],
            "spacing_mm": [float(s) for s in entry["spacing"]],
            "origin_mm": list(fixed_image.GetOrigin()),
            "direction": list(fixed_image.GetDirection()),
            "orientation": fmt.get("orientation_note", ""),
            "intensity": (
                f"HU = stored value {int(fmt.get('hu_offset', 0)):+d}" if fmt.get("hu_offset") else "as stored"
            ),
            "landmarks": {
                "count": int(len(fixed_points)),
                "index_base": 1,
                "conversion": "world mm = image.TransformContinuousIndexToPhysicalPoint(index - 1)",
            },
            "initial_mean_tre_mm": entry.get("initial_mean_tre_mm"),
            "initial_mean_tre_mm_measured": round(_identity_tre(fixed_points, moving_points), 4),
            "prepared_by": f"regsam {_regsam_version()} regsam.data.prepare",
        }
        return write_case(
            out / f"{name}_{entry['id']}",
            fixed_image,
            moving_image,
            fixed_points=fixed_points,
            moving_points=moving_points,
            meta=meta,
        )


def _select_entries(manifest: dict, cases: Sequence[str] | None, found: Callable[[dict], bool]) -> list[dict]:
    if cases:
        chosen: list[dict] = []
        for case in cases:
            entry = find_case(manifest, case)
            if entry not in chosen:
                chosen.append(entry)
        return chosen
    return [entry for entry in manifest["cases"] if found(entry)]


def _plan_dirlab(manifest: dict, root: Path, cases: Sequence[str] | None) -> list[_RawPlan]:
    name = manifest["name"]
    finder = _FileFinder(root)
    landmark_format = manifest.get("landmark_format", {})
    expected_count = landmark_format.get("count")

    def files_of(entry: dict) -> list[tuple[str, list[str]]]:
        return [
            (entry[role][key], entry[role].get(alt, []))
            for role in ("fixed", "moving")
            for key, alt in (("image", "image_alternatives"), ("landmarks", "landmark_alternatives"))
        ]

    def found(entry: dict) -> bool:
        return any(finder.find(rel, alts) is not None for rel, alts in files_of(entry))

    entries = _select_entries(manifest, cases, found)
    if not entries:
        example = manifest["cases"][0]["fixed"]["image"]
        raise InputError(
            f"{name}: no case files found under {root} (expected e.g. {example}); "
            "is --root the folder the download was unpacked into?"
        )

    plans = []
    for entry in entries:
        where = f"{name} {entry.get('label', entry['id'])}"
        sides = {}
        for role in ("fixed", "moving"):
            spec = entry[role]
            image = finder.find(spec["image"], spec.get("image_alternatives", []))
            if image is None:
                raise finder.missing(where, "image file", spec["image"], spec.get("image_alternatives", []))
            _check_raw_size(image, entry, where, _show(image, root))
            _check_sha256(image, spec.get("image_sha256"), where, _show(image, root))
            landmarks = finder.find(spec["landmarks"], spec.get("landmark_alternatives", []))
            if landmarks is None:
                raise finder.missing(where, "landmark file", spec["landmarks"], spec.get("landmark_alternatives", []))
            shown = _show(landmarks, root)
            _check_sha256(landmarks, spec.get("landmarks_sha256"), where, shown)
            try:
                index1 = read_dirlab_index(landmarks)
            except InputError as exc:
                raise InputError(f"{where}: {exc}") from None
            if expected_count is not None and len(index1) != int(expected_count):
                raise InputError(f"{where}: {shown} has {len(index1)} landmarks, expected {expected_count}")
            _check_bounds(index1 - 1.0, entry["size"], where, shown, base=1)
            sides[role] = _RawSide(role, spec.get("phase", role), image, landmarks, index1)
        if len(sides["fixed"].index1) != len(sides["moving"].index1):
            raise InputError(
                f"{where}: {_show(sides['fixed'].landmarks, root)} has {len(sides['fixed'].index1)} landmarks but"
                f" {_show(sides['moving'].landmarks, root)} has {len(sides['moving'].index1)}"
            )
        plans.append(_RawPlan(manifest, entry, root, sides["fixed"], sides["moving"]))
    return plans


def _check_raw_size(path: Path, entry: dict, where: str, shown: str) -> None:
    expected = int(entry.get("image_bytes") or int(np.prod(entry["size"])) * 2)
    actual = path.stat().st_size
    if actual < expected:
        raise InputError(f"{where}: {shown} is {expected - actual} bytes short of {expected} bytes (truncated?)")
    if actual > expected:
        dims = "x".join(str(int(s)) for s in entry["size"])
        raise InputError(
            f"{where}: {shown} is {actual - expected} bytes longer than {expected} bytes"
            f" (not a headerless {dims} int16 volume; wrong case or a different file?)"
        )


# ---------------------------------------------------------------- Learn2Reg (NLST)
def read_keypoints_csv(path: Path) -> np.ndarray:
    """Parse a Learn2Reg keypoint CSV into an (N, 3) array of 0-based voxel indices (x, y, z).

    The files hold one ``x,y,z`` line per keypoint with no header; whitespace-separated
    copies are accepted too.

    Raises:
        InputError: unreadable file, a line that is not three numbers, no keypoints.
    """
    rows = _read_index_triples(path, "keypoint file", r"[,;\s]+", "x,y,z")
    if not len(rows):
        raise InputError(f"{path}: no keypoints in file")
    return rows


def _template_path(folder: Path, template: str, case_id: str, modality: str) -> Path:
    return folder / template.format(id=case_id, modality=modality)


def _learn2reg_folder(manifest: dict, root: Path) -> Path:
    """The dataset folder (holding ``imagesTr``): ``root`` itself, ``root/NLST`` or one or two levels below."""
    layout = manifest["layout"]
    image_dir = PurePosixPath(layout["image"]).parent.as_posix()
    candidates = [root, root / layout.get("folder", "")]
    candidates += sorted(p.parent for p in root.glob(f"*/{image_dir}"))
    candidates += sorted(p.parent for p in root.glob(f"*/*/{image_dir}"))
    for candidate in candidates:
        if (candidate / image_dir).is_dir():
            return candidate
    raise InputError(
        f"{manifest['name']}: no {layout.get('folder', '')}/{image_dir} folder under {root}"
        f" (give --root the folder holding {layout.get('folder', '')}/ or that folder itself)"
    )


@dataclass
class _Learn2RegPlan(_Plan):
    manifest: dict
    case_id: str
    folder: Path
    root: Path
    files: dict[str, Path]  # fixed_image, moving_image, fixed_mask, moving_mask, fixed_keypoints, moving_keypoints
    fixed_index0: np.ndarray
    moving_index0: np.ndarray

    def write(self, out: Path) -> Case:
        name = self.manifest["name"]
        label = f"{name.upper()}_{self.case_id}"
        fixed = read_image(self.files["fixed_image"], label)
        moving = read_image(self.files["moving_image"], label)
        fixed_mask = read_image(self.files["fixed_mask"], label)
        moving_mask = read_image(self.files["moving_mask"], label)
        # Keypoints are voxel indices into their own image: its header geometry gives the mm position.
        fixed_points = _index_to_world(fixed, self.fixed_index0)
        moving_points = _index_to_world(moving, self.moving_index0)
        pairing = self.manifest.get("pairing", {})
        keypoint_format = self.manifest.get("keypoint_format", {})
        meta = {
            "dataset": name,
            "case": self.case_id,
            "case_label": label,
            "description": self.manifest["description"],
            "citation": self.manifest["citation"],
            "url": self.manifest["url"],
            "fixed": {
                "meaning": pairing.get("fixed", ""),
                "image": _show(self.files["fixed_image"], self.root),
                "mask": _show(self.files["fixed_mask"], self.root),
                "keypoints": _show(self.files["fixed_keypoints"], self.root),
            },
            "moving": {
                "meaning": pairing.get("moving", ""),
                "image": _show(self.files["moving_image"], self.root),
                "mask": _show(self.files["moving_mask"], self.root),
                "keypoints": _show(self.files["moving_keypoints"], self.root),
            },
            "size": list(fixed.GetSize()),
            "spacing_mm": list(fixed.GetSpacing()),
            "origin_mm": list(fixed.GetOrigin()),
            "direction": list(fixed.GetDirection()),
            "keypoints": {
                "count": int(len(fixed_points)),
                "index_base": 0,
                "source": keypoint_format.get("source", ""),
                "conversion": "world mm = image.TransformContinuousIndexToPhysicalPoint(index)",
            },
            "initial_mean_tre_mm": None,
            "initial_mean_tre_mm_measured": round(_identity_tre(fixed_points, moving_points), 4),
            "prepared_by": f"regsam {_regsam_version()} regsam.data.prepare",
        }
        return write_case(
            out / f"{name}_{self.case_id}",
            fixed,
            moving,
            fixed_points=fixed_points,
            moving_points=moving_points,
            fixed_mask=fixed_mask,
            moving_mask=moving_mask,
            meta=meta,
        )


def _plan_learn2reg(manifest: dict, root: Path, cases: Sequence[str] | None) -> list[_Learn2RegPlan]:
    name = manifest["name"]
    layout = manifest["layout"]
    fixed_mod, moving_mod = layout["fixed_modality"], layout["moving_modality"]
    folder = _learn2reg_folder(manifest, root)
    width = max(len(entry["id"]) for entry in manifest["cases"]) if manifest["cases"] else 4

    def path(kind: str, case_id: str, modality: str) -> Path:
        return _template_path(folder, layout[kind], case_id, modality)

    # Pairs present in the download: every fixed image imagesTr/NLST_XXXX_0000.nii.gz.
    image_name = PurePosixPath(layout["image"])
    pattern = re.compile(
        re.escape(image_name.name)
        .replace(re.escape("{id}"), r"(\d+)")
        .replace(re.escape("{modality}"), re.escape(fixed_mod))
    )
    image_dir = folder / image_name.parent.as_posix()
    present = sorted({m.group(1) for p in image_dir.iterdir() if (m := pattern.fullmatch(p.name))})

    if cases:
        ids: list[str] = []
        for case in cases:
            number = _case_number(case)
            if number is None:
                raise InputError(f"{name}: case '{case}' is not a case number such as 1, 0001 or NLST_0001")
            case_id = f"{number:0{width}d}"
            if case_id not in ids:
                ids.append(case_id)
    else:
        ids = [
            i
            for i in present
            if path("keypoints", i, fixed_mod).is_file() and path("keypoints", i, moving_mod).is_file()
        ]
        if not ids:
            example = path("keypoints", present[0] if present else "0001", fixed_mod)
            raise InputError(
                f"{name}: no image pair under {_show(image_dir, root)} has keypoint files "
                f"(expected e.g. {_show(example, root)})"
            )

    size = manifest.get("image_format", {}).get("size")
    spacing = manifest.get("image_format", {}).get("spacing")
    plans = []
    for case_id in ids:
        where = f"{name} {name.upper()}_{case_id}"
        files = {
            f"{role}_{kind}": path(kind, case_id, mod)
            for role, mod in (("fixed", fixed_mod), ("moving", moving_mod))
            for kind in ("image", "mask", "keypoints")
        }
        for key, file_path in files.items():
            if not file_path.is_file():
                what = {"image": "image file", "mask": "mask file", "keypoints": "keypoint file"}[key.split("_", 1)[1]]
                raise InputError(f"{where}: missing {what} {file_path.name} (expected at {_show(file_path, root)})")
        images = {}
        for role in ("fixed", "moving"):
            shown = _show(files[f"{role}_image"], root)
            image = read_image(files[f"{role}_image"], f"{where}: {shown}")
            _check_geometry(image, size, spacing, where, shown)
            mask_shown = _show(files[f"{role}_mask"], root)
            mask = read_image(files[f"{role}_mask"], f"{where}: {mask_shown}")
            if not same_grid(image, mask):
                raise InputError(
                    f"{where}: {mask_shown} is not on the grid of {shown} (size {mask.GetSize()} vs {image.GetSize()})"
                )
            images[role] = image
        index = {}
        for role in ("fixed", "moving"):
            shown = _show(files[f"{role}_keypoints"], root)
            try:
                index[role] = read_keypoints_csv(files[f"{role}_keypoints"])
            except InputError as exc:
                raise InputError(f"{where}: {exc}") from None
            _check_bounds(index[role], images[role].GetSize(), where, shown, base=0)
        if len(index["fixed"]) != len(index["moving"]):
            raise InputError(
                f"{where}: {_show(files['fixed_keypoints'], root)} has {len(index['fixed'])} keypoints but"
                f" {_show(files['moving_keypoints'], root)} has {len(index['moving'])}"
            )
        plans.append(_Learn2RegPlan(manifest, case_id, folder, root, files, index["fixed"], index["moving"]))
    return plans


def _check_geometry(
    image: sitk.Image, size: Sequence[int] | None, spacing: Sequence[float] | None, where: str, shown: str
) -> None:
    bad_size = size is not None and tuple(image.GetSize()) != tuple(int(s) for s in size)
    bad_spacing = spacing is not None and not np.allclose(image.GetSpacing(), spacing, atol=SPACING_TOLERANCE_MM)
    if bad_size or bad_spacing:
        got = "x".join(str(s) for s in image.GetSize()) + " voxels at " + "x".join(f"{s:g}" for s in image.GetSpacing())
        want = "x".join(str(int(s)) for s in size or image.GetSize()) + " voxels at "
        want += "x".join(f"{float(s):g}" for s in spacing or image.GetSpacing())
        raise InputError(f"{where}: {shown} is {got} mm, expected {want} mm (a different release or a resampled copy?)")


def _case_number(text: str) -> int | None:
    digits = re.findall(r"\d+", str(text))
    return int(digits[-1]) if digits else None
