"""Landmark (point set) files.

In memory a point set is a float64 array of shape (N, 3): world coordinates in
mm, LPS, as SimpleITK reports them. The regsam exchange format is a CSV with
header ``x,y,z``. Also read and written here:

* DIR-Lab ``*_xyz.txt``: 1-based voxel indices, one ``x y z`` row per point.
* elastix/transformix input point files (``.txt``/``.pts``): a ``point`` (mm) or
  ``index`` (0-based voxel) header line, a count line, then one row per point.
* transformix ``outputpoints.txt`` (read only).
* 3D Slicer markups ``.mrk.json`` and ``.fcsv`` (LPS or RAS; RAS is converted).

:func:`read_points` / :func:`write_points` pick the format from the file name.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Union

import numpy as np
import SimpleITK as sitk

from regsam.errors import InputError
from regsam.io.atomic import atomic_path

#: What a voxel-index format needs to become mm: the image the indices refer to,
#: or a spacing ``(sx, sy, sz)`` mm meaning origin 0 and identity direction.
Reference = Union[sitk.Image, tuple, list, np.ndarray]

SLICER_SCHEMA = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/"
    "Markups/Resources/Schema/markups-schema-v1.0.3.json#"
)
FCSV_COLUMNS = "id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID"
# RAS and LPS differ by the sign of the first two axes.
_RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])
_DIRLAB_NAME = re.compile(r"_xyz(_r\d+)?\.txt$", re.IGNORECASE)


def as_points(points: np.ndarray, name: str = "points") -> np.ndarray:
    """Return ``points`` as a float64 (N, 3) array; :class:`InputError` naming ``name`` if not finite numeric (N, 3)."""
    try:
        arr = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{name}: not numeric") from None
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise InputError(f"{name}: expected an (N, 3) array of x,y,z mm, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise InputError(f"{name}: contains NaN or infinite coordinates")
    return arr


def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"landmark file not found: {path}")
    return path


def _write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def read_points_csv(path: str | os.PathLike) -> np.ndarray:
    """Read a CSV with header ``x,y,z`` (mm, world LPS) into an (N, 3) array."""
    path = _existing_file(path)
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip().lower() for h in next(reader)]
        except StopIteration:
            raise InputError(f"{path}: empty landmark file") from None
        try:
            cols = [header.index(c) for c in ("x", "y", "z")]
        except ValueError:
            raise InputError(f"{path}: header must contain x,y,z, got {','.join(header)}") from None
        rows = []
        for line_no, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            try:
                rows.append([float(row[c]) for c in cols])
            except (ValueError, IndexError):
                raise InputError(f"{path}:{line_no}: not three numbers: {','.join(row)}") from None
    return as_points(np.array(rows, dtype=np.float64).reshape(-1, 3), str(path))


def write_points_csv(points: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an (N, 3) array of mm world points as CSV with header ``x,y,z``."""
    arr = as_points(points)
    lines = ["x,y,z"] + [f"{x:.6f},{y:.6f},{z:.6f}" for x, y, z in arr]
    return _write_text(path, "\n".join(lines) + "\n")


# --- voxel indices <-> mm -------------------------------------------------------------


def index_to_points(index: np.ndarray, reference: Reference) -> np.ndarray:
    """0-based continuous voxel indices (N, 3) -> mm world points (N, 3) on ``reference``.

    ``reference`` is a ``SimpleITK.Image`` (its origin, spacing and direction are used)
    or a spacing ``(sx, sy, sz)`` in mm meaning origin 0 and identity direction.
    """
    index = np.asarray(index, dtype=np.float64).reshape(-1, 3)
    if isinstance(reference, sitk.Image):
        if reference.GetDimension() != 3:
            raise InputError(f"reference image is {reference.GetDimension()}D; voxel indices need a 3D image")
        return np.array(
            [reference.TransformContinuousIndexToPhysicalPoint(row.tolist()) for row in index], dtype=np.float64
        ).reshape(-1, 3)
    return index * _spacing(reference)


def points_to_index(points: np.ndarray, reference: Reference) -> np.ndarray:
    """mm world points (N, 3) -> 0-based continuous voxel indices (N, 3); inverse of :func:`index_to_points`."""
    points = as_points(points)
    if isinstance(reference, sitk.Image):
        if reference.GetDimension() != 3:
            raise InputError(f"reference image is {reference.GetDimension()}D; voxel indices need a 3D image")
        return np.array(
            [reference.TransformPhysicalPointToContinuousIndex(row.tolist()) for row in points], dtype=np.float64
        ).reshape(-1, 3)
    return points / _spacing(reference)


def _spacing(reference: Reference) -> np.ndarray:
    try:
        spacing = np.asarray(reference, dtype=np.float64).reshape(3)
    except (TypeError, ValueError):
        raise InputError(
            f"reference must be a SimpleITK image or a spacing (sx, sy, sz) in mm, got {reference!r}"
        ) from None
    if not (np.isfinite(spacing).all() and (spacing > 0).all()):
        raise InputError(f"reference spacing must be three positive numbers (mm), got {spacing.tolist()}")
    return spacing


def _format_row(row: np.ndarray, sep: str) -> str:
    return sep.join(f"{v:.6f}" for v in row)


# --- DIR-Lab --------------------------------------------------------------------------


def read_dirlab_xyz(path: str | os.PathLike, reference: Reference) -> np.ndarray:
    """Read a DIR-Lab ``_xyz.txt`` file (1-based voxel indices ``x y z`` per row) as mm world points.

    Args:
        reference: the image the indices refer to (a ``SimpleITK.Image``, its geometry is used),
            or a voxel spacing ``(sx, sy, sz)`` in mm, meaning origin 0 and identity direction
            (DIR-Lab's documented ``mm = (index - 1) * spacing``).
    """
    path = _existing_file(path)
    try:
        index = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise InputError(f"{path}: not a DIR-Lab landmark file ({exc})") from None
    if index.ndim != 2 or index.shape[1] != 3:
        raise InputError(f"{path}: expected 3 columns (x y z voxel indices), got shape {index.shape}")
    if not np.isfinite(index).all():
        raise InputError(f"{path}: contains NaN or infinite voxel indices")
    return as_points(index_to_points(index - 1.0, reference), str(path))


def write_dirlab_xyz(points: np.ndarray, path: str | os.PathLike, reference: Reference) -> Path:
    """Write mm world points (N, 3) as a DIR-Lab ``_xyz.txt`` file of 1-based voxel indices.

    Inverse of :func:`read_dirlab_xyz` with the same ``reference``. Points on voxel
    centres are written as integers like DIR-Lab's own files; other points keep
    their sub-voxel position as decimals (6 places), which :func:`read_dirlab_xyz` accepts.
    """
    one_based = points_to_index(points, reference) + 1.0
    rounded = np.round(one_based)
    # Index arithmetic through the image geometry leaves ~1e-12 voxel noise on exact centres.
    if np.allclose(one_based, rounded, rtol=0.0, atol=1e-4):
        lines = ["\t".join(str(int(v)) for v in row) for row in rounded]
    else:
        lines = [_format_row(row, "\t") for row in one_based]
    return _write_text(path, "\n".join(lines) + "\n")


# --- elastix / transformix ------------------------------------------------------------


def read_elastix_points(path: str | os.PathLike, reference: Reference | None = None) -> np.ndarray:
    """Read an elastix/transformix input point file as mm world points (N, 3).

    The file is ``point`` (rows in mm, world LPS) or ``index`` (rows are 0-based
    voxel indices of ``reference``), then the number of points, then one ``x y z``
    row per point. Like elastix, a file without that header line holds indices.

    Raises:
        InputError: unreadable rows, wrong column count, a count line that does not match
            the rows, or an index file without ``reference``.
    """
    path = _existing_file(path)
    tokens_per_line = [line.split() for line in path.read_text().splitlines()]
    lines = [(no, toks) for no, toks in enumerate(tokens_per_line, start=1) if toks]
    if not lines:
        raise InputError(f"{path}: empty point file")
    header = lines[0][1][0].lower()
    if header in ("point", "index"):
        is_index = header == "index"
        # The count may sit on the header line itself ("point 3") or on its own line.
        rest = lines[0][1][1:] or (lines[1][1] if len(lines) > 1 else [])
        body = lines[1:] if lines[0][1][1:] else lines[2:]
    else:
        is_index, rest, body = True, lines[0][1], lines[1:]
    try:
        (count,) = (int(t) for t in rest)
    except ValueError:
        raise InputError(
            f"{path}: expected a 'point' or 'index' line, then the number of points; "
            f"got {' '.join(rest)!r} as the count"
        ) from None
    rows = []
    for line_no, toks in body:
        if len(toks) != 3:
            raise InputError(f"{path}:{line_no}: expected 3 coordinates, got {len(toks)}: {' '.join(toks)}")
        try:
            rows.append([float(t) for t in toks])
        except ValueError:
            raise InputError(f"{path}:{line_no}: not three numbers: {' '.join(toks)}") from None
    if len(rows) != count:
        raise InputError(f"{path}: count line says {count} points but the file holds {len(rows)}")
    values = as_points(np.array(rows, dtype=np.float64).reshape(-1, 3), str(path))
    if not is_index:
        return values
    if reference is None:
        raise InputError(f"{path}: holds voxel indices ('index'); pass the reference image they refer to")
    return index_to_points(values, reference)


def write_elastix_points(points: np.ndarray, path: str | os.PathLike) -> Path:
    """Write mm world points (N, 3) as an elastix/transformix ``point`` file."""
    arr = as_points(points)
    lines = ["point", str(len(arr))] + [_format_row(row, " ") for row in arr]
    return _write_text(path, "\n".join(lines) + "\n")


_TRANSFORMIX_FIELD = re.compile(r"(\w+)\s*=\s*\[([^\]]*)\]")


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z])(?=[A-Z])", "_", name).lower()


def read_transformix_output(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Parse transformix's ``outputpoints.txt``.

    Each line looks like ``Point 0 ; InputIndex = [ 1 2 3 ] ; InputPoint = [ ... ] ;
    OutputIndexFixed = [ ... ] ; OutputPoint = [ ... ] ; Deformation = [ ... ]``.

    Returns:
        ``{"input_point", "output_point", "deformation"}`` as float64 (N, 3) arrays in mm
        (world LPS), plus any other bracketed field of the file under its snake_case name
        (``input_index``, ``output_index_fixed``, ``output_index_moving`` ...), also (N, 3).
        ``deformation`` is ``output_point - input_point`` when the file lacks it.
    """
    path = _existing_file(path)
    columns: dict[str, list[list[float]]] = {}
    n = 0
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = _TRANSFORMIX_FIELD.findall(line)
        if not line.lstrip().startswith("Point") or not fields:
            raise InputError(f"{path}:{line_no}: not a transformix output point line: {line.strip()[:80]}")
        for key, values in fields:
            try:
                vector = [float(v) for v in values.split()]
            except ValueError:
                raise InputError(f"{path}:{line_no}: {key} is not a list of numbers: [{values.strip()}]") from None
            if len(vector) != 3:
                raise InputError(f"{path}:{line_no}: {key} has {len(vector)} values, expected 3")
            columns.setdefault(_snake(key), []).append(vector)
        n += 1
    if n == 0:
        raise InputError(f"{path}: empty transformix output point file")
    out = {}
    for key, rows in columns.items():
        if len(rows) != n:
            raise InputError(f"{path}: {key} is given on {len(rows)} of {n} lines")
        out[key] = as_points(np.array(rows, dtype=np.float64), f"{path} ({key})")
    for key in ("input_point", "output_point"):
        if key not in out:
            raise InputError(f"{path}: no {''.join(w.title() for w in key.split('_'))} fields")
    out.setdefault("deformation", out["output_point"] - out["input_point"])
    return out


# --- 3D Slicer markups ---------------------------------------------------------------


def _to_lps(points: np.ndarray, system: str, path: Path) -> np.ndarray:
    system = system.strip().upper()
    # Slicer's legacy numeric codes: 0 = RAS, 1 = LPS.
    if system in ("RAS", "0"):
        return points * _RAS_TO_LPS
    if system in ("LPS", "1"):
        return points
    raise InputError(f"{path}: unknown coordinate system {system!r} (expected LPS or RAS)")


def read_slicer_json(path: str | os.PathLike) -> np.ndarray:
    """Read the control points of the first markup in a Slicer ``.mrk.json`` file as mm LPS (N, 3).

    Honours the markup's ``coordinateSystem`` (``LPS``, the schema default, or ``RAS``)
    and ``coordinateUnits`` (``mm`` or ``um``).
    """
    path = _existing_file(path)
    try:
        doc = json.loads(path.read_text())
        markup = doc["markups"][0]
        control_points = markup.get("controlPoints", [])
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except (KeyError, IndexError, TypeError, AttributeError):
        raise InputError(f"{path}: not a Slicer markups file (no markups[0].controlPoints)") from None
    rows = []
    for i, point in enumerate(control_points):
        # Unplaced points would silently shift every later correspondence, so refuse them.
        status = point.get("positionStatus", "defined") if isinstance(point, dict) else None
        position = point.get("position") if isinstance(point, dict) else None
        if status != "defined" or not isinstance(position, list) or len(position) != 3:
            raise InputError(f"{path}: control point {i} has no defined 3D position (positionStatus={status!r})")
        rows.append(position)
    try:
        points = np.array(rows, dtype=np.float64).reshape(-1, 3)
    except (TypeError, ValueError):
        raise InputError(f"{path}: control point positions are not numbers") from None
    units = markup.get("coordinateUnits", "mm")
    units = units[0] if isinstance(units, list) and units else units
    if units not in ("mm", "um"):
        raise InputError(f"{path}: unsupported coordinateUnits {units!r} (expected mm or um)")
    if units == "um":
        points = points / 1000.0
    points = _to_lps(points, str(markup.get("coordinateSystem", "LPS")), path)
    return as_points(points, str(path))


def write_slicer_json(points: np.ndarray, path: str | os.PathLike) -> Path:
    """Write mm LPS points (N, 3) as a Slicer fiducial markup (``.mrk.json``, schema v1.0.3, LPS)."""
    arr = as_points(points)
    control_points = [
        {
            "id": str(i + 1),
            "label": f"F-{i + 1}",
            "description": "",
            "associatedNodeID": "",
            "position": [float(v) for v in row],
            "orientation": [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0],
            "selected": True,
            "locked": False,
            "visibility": True,
            "positionStatus": "defined",
        }
        for i, row in enumerate(arr)
    ]
    doc = {
        "@schema": SLICER_SCHEMA,
        "markups": [
            {
                "type": "Fiducial",
                "coordinateSystem": "LPS",
                "coordinateUnits": "mm",
                "locked": False,
                "fixedNumberOfControlPoints": False,
                "labelFormat": "%N-%d",
                "lastUsedControlPointNumber": len(arr),
                "controlPoints": control_points,
                "measurements": [],
            }
        ],
    }
    return _write_text(path, json.dumps(doc, indent=4) + "\n")


def read_fcsv(path: str | os.PathLike) -> np.ndarray:
    """Read a Slicer ``.fcsv`` markups fiducial file as mm LPS points (N, 3).

    ``# CoordinateSystem`` may be ``LPS``, ``RAS``, ``1`` (LPS) or ``0`` (RAS); files
    without that line are RAS (Slicer before 4.11). Columns follow ``# columns =``
    when present, else Slicer's default ``id,x,y,z,...``.
    """
    path = _existing_file(path)
    system, columns = "RAS", FCSV_COLUMNS.split(",")
    rows = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if line.startswith("#"):
            key, _, value = line[1:].partition("=")
            key = key.strip().lower()
            if key == "coordinatesystem":
                system = value.strip()
            elif key == "columns":
                columns = [c.strip().lower() for c in value.split(",")]
            continue
        if not line.strip():
            continue
        row = next(csv.reader(io.StringIO(line)))
        try:
            cols = [columns.index(c) for c in ("x", "y", "z")]
        except ValueError:
            raise InputError(f"{path}: '# columns' line has no x,y,z") from None
        try:
            rows.append([float(row[c]) for c in cols])
        except (ValueError, IndexError):
            wanted = [c + 1 for c in cols]
            raise InputError(f"{path}:{line_no}: expected x,y,z in columns {wanted}: {line[:80]}") from None
    points = np.array(rows, dtype=np.float64).reshape(-1, 3)
    return as_points(_to_lps(points, system, path), str(path))


def write_fcsv(points: np.ndarray, path: str | os.PathLike) -> Path:
    """Write mm LPS points (N, 3) as a Slicer 4.11 ``.fcsv`` file in LPS."""
    arr = as_points(points)
    lines = [
        "# Markups fiducial file version = 4.11",
        "# CoordinateSystem = LPS",
        f"# columns = {FCSV_COLUMNS}",
    ]
    lines += [f"{i + 1},{_format_row(row, ',')},0,0,0,1,1,1,0,F-{i + 1},," for i, row in enumerate(arr)]
    return _write_text(path, "\n".join(lines) + "\n")


# --- dispatch by file name -----------------------------------------------------------


def point_file_format(path: str | os.PathLike, sniff: bool = True) -> str:
    """The landmark format a file name stands for.

    Returns one of ``csv``, ``dirlab``, ``transformix``, ``elastix``, ``slicer_json``, ``fcsv``.
    With ``sniff``, an existing ``.txt``/``.pts`` file whose first line starts with ``Point``
    is transformix output whatever its name (writers do not sniff: they replace the file).
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".mrk.json"):
        return "slicer_json"
    if name.endswith(".fcsv"):
        return "fcsv"
    if name.endswith(".csv"):
        return "csv"
    if _DIRLAB_NAME.search(name):
        return "dirlab"
    if name.endswith("outputpoints.txt"):
        return "transformix"
    if name.endswith(".txt") or name.endswith(".pts"):
        if sniff and path.is_file():
            with open(path) as fh:
                if fh.readline().lstrip().startswith("Point"):
                    return "transformix"
        return "elastix"
    raise InputError(
        f"{path}: unknown landmark format "
        "(expected .csv, _xyz.txt, .txt/.pts elastix, outputpoints.txt, .mrk.json or .fcsv)"
    )


def read_points(path: str | os.PathLike, reference: Reference | None = None) -> np.ndarray:
    """Read any supported landmark file as mm world LPS points (N, 3); the format comes from the name.

    Args:
        reference: image (or spacing in mm) that voxel-index formats refer to; needed for
            DIR-Lab ``_xyz.txt`` files and elastix ``index`` files, ignored otherwise.
            For transformix ``outputpoints.txt`` the ``OutputPoint`` column is returned.
    """
    kind = point_file_format(path)
    if kind == "dirlab":
        if reference is None:
            raise InputError(f"{path}: DIR-Lab files hold voxel indices; pass the reference image or spacing")
        return read_dirlab_xyz(path, reference)
    if kind == "elastix":
        return read_elastix_points(path, reference)
    if kind == "transformix":
        return read_transformix_output(path)["output_point"]
    readers = {"csv": read_points_csv, "slicer_json": read_slicer_json, "fcsv": read_fcsv}
    return readers[kind](path)


def write_points(points: np.ndarray, path: str | os.PathLike, reference: Reference | None = None) -> Path:
    """Write mm world LPS points (N, 3) in the format the file name stands for (see :func:`read_points`).

    ``reference`` is needed for DIR-Lab ``_xyz.txt``; elastix files are written as ``point`` (mm).
    """
    kind = point_file_format(path, sniff=False)
    if kind == "dirlab":
        if reference is None:
            raise InputError(f"{path}: DIR-Lab files hold voxel indices; pass the reference image or spacing")
        return write_dirlab_xyz(points, path, reference)
    if kind == "transformix":
        raise InputError(f"{path}: transformix output files are written by transformix, not regsam")
    writers = {
        "csv": write_points_csv,
        "elastix": write_elastix_points,
        "slicer_json": write_slicer_json,
        "fcsv": write_fcsv,
    }
    return writers[kind](points, path)
