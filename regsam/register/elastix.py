"""Elastix (through itk-elastix) as a regsam registration method.

Presets are elastix parameter files shipped in ``regsam/configs/elastix/``, one file
per stage, run in order (each stage starts from the previous stages' transform):

``lung`` (default)
    affine, then cubic B-spline with AdvancedNormalizedCorrelation + bending energy,
    4 resolutions each, final grid spacing 10 mm; modelled on the elastix model zoo
    entry Par0011 (lung CT, EMPIRE10). See the files for every setting and its origin.
``fast``
    the same pipeline with 3 resolutions, fewer iterations and samples and a 16 mm grid.

The displacement field is transformix's deformation field on the fixed grid
(fixed ``x`` -> moving ``x + u(x)``), the warped image is the moving image resampled
through it.

A stage whose metric gradient is exactly zero from its first iteration on (an image registered to
itself: nothing to do) makes elastix fail, because the B-spline presets rescale the bending-energy
gradient relative to the similarity's (0/0) and estimate the step size from it; such a stage is
recorded as ``skipped`` (identity) instead. Any other failure is a ``RuntimeError`` whose message
is the relevant line of the stage's elastix log. Elastix writes its files and logs into a temporary folder, never the
current directory; the final TransformParameters files and the logs are kept as
result artifacts (``elastix/`` in a result folder).

Two additions serve ``--method sam+elastix`` (:mod:`regsam.register.sam_elastix`) and any caller:

* ``initial_transform``: a linear SimpleITK transform (fixed -> moving, mm) that elastix starts
  from. It becomes the first TransformParameters map (an elastix ``AffineTransform``, see
  :func:`linear_to_parameter_map`); every stage composes onto it, and the field, the saved
  TransformParameters files and ``affine`` all include it.
* ``corresponding_points``: fixed/moving point pairs added to the named stages (default the
  B-spline ones) as elastix's ``CorrespondingPointsEuclideanDistanceMetric``, an extra metric
  of the multi-metric registration, with one (relative) weight per resolution
  (:func:`add_points_metric`). The point files (elastix ``point`` format) are kept as artifacts.
"""

from __future__ import annotations

import os

# Must be set before itk is imported: elastix crashes with ITK's default threader in this build.
os.environ.setdefault("ITK_GLOBAL_DEFAULT_THREADER", "Pool")

import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Mapping, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, NamedTuple  # noqa: E402

import itk  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from regsam.errors import InputError  # noqa: E402
from regsam.io.geometry import direction_matrix  # noqa: E402
from regsam.io.images import AIR_HU  # noqa: E402
from regsam.io.landmarks import as_points, write_elastix_points  # noqa: E402
from regsam.io.transforms import warp_image  # noqa: E402
from regsam.register.presets import (  # noqa: E402
    ELASTIX_CONFIG_DIR,
    ELASTIX_DEFAULT_PRESET,
    ELASTIX_PRESETS,
    ElastixPreset,
    choose_preset,
    preset_settings,
)
from regsam.register.result import RegistrationResult, linear_to_matrix  # noqa: E402
from regsam.register.stages import Stage, timed  # noqa: E402

CONFIG_DIR = ELASTIX_CONFIG_DIR

#: Preset name -> :class:`~regsam.register.presets.ElastixPreset` (parameter files in ``CONFIG_DIR``, one per stage).
PRESETS: dict[str, ElastixPreset] = ELASTIX_PRESETS
DEFAULT_PRESET = ELASTIX_DEFAULT_PRESET

_STAGE_NAMES = {
    "TranslationTransform": "translation",
    "EulerTransform": "rigid",
    "SimilarityTransform": "similarity",
    "AffineTransform": "affine",
    "BSplineTransform": "bspline",
    "RecursiveBSplineTransform": "bspline",
}
#: Linear SimpleITK transforms (3D) that :func:`linear_to_parameter_map` accepts.
_SITK_LINEAR = {
    "AffineTransform", "Euler3DTransform", "TranslationTransform", "Similarity3DTransform", "VersorRigid3DTransform",
    "VersorTransform", "ScaleTransform", "ScaleVersor3DTransform", "ScaleSkewVersor3DTransform",
    "ComposeScaleSkewVersor3DTransform",
}
#: Linear elastix transforms and their number of parameters (3D).
_LINEAR = {"TranslationTransform": 3, "EulerTransform": 6, "SimilarityTransform": 7, "AffineTransform": 12}


# ------------------------------------------------------------------ parameter maps
def preset_files(preset: str | None) -> list[Path]:
    """The parameter files of a preset (``None`` means :data:`DEFAULT_PRESET`)."""
    return choose_preset(PRESETS, preset, DEFAULT_PRESET, "elastix")[1].paths


def _scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _values(value) -> list[str]:
    """A parameter value (scalar or sequence) as elastix's list of strings."""
    if isinstance(value, (list, tuple)):
        return [_scalar(v) for v in value]
    return [_scalar(value)]


def read_parameter_map(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read one elastix parameter file into a dict of string lists (the form itk-elastix uses)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"elastix parameter file not found: {path}")
    po = itk.ParameterObject.New()
    try:
        po.ReadParameterFile(str(path))
    except RuntimeError as exc:
        raise InputError(f"{path}: not a valid elastix parameter file ({_first_line(exc)})") from None
    pmap = {str(k): [str(v) for v in vals] for k, vals in dict(po.GetParameterMap(0)).items()}
    if "Transform" not in pmap:
        raise InputError(f"{path}: elastix parameter file without a (Transform ...) entry")
    return pmap


def format_parameter_map(pmap: Mapping[str, Sequence[str]]) -> str:
    """An elastix parameter file's text for a parameter map (numbers bare, everything else quoted)."""
    number = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
    lines = []
    for key in sorted(pmap):
        vals = " ".join(v if number.match(v) else f'"{v}"' for v in pmap[key])
        lines.append(f"({key} {vals})")
    return "\n".join(lines) + "\n"


def _stage_name(pmap: Mapping[str, Sequence[str]], taken: set[str]) -> str:
    transform = pmap["Transform"][0]
    base = _STAGE_NAMES.get(transform, transform.removesuffix("Transform").lower() or "stage")
    name, n = base, 2
    while name in taken:
        name, n = f"{base}{n}", n + 1
    return name


# ------------------------------------------------------------------ image conversion
def sitk_to_itk(image: sitk.Image, pixel_type=np.float32) -> itk.Image:
    """A SimpleITK scalar image as an ITK image of ``pixel_type`` with the same geometry."""
    arr = np.ascontiguousarray(sitk.GetArrayViewFromImage(image), dtype=pixel_type)
    out = itk.image_from_array(arr)  # copies
    out.SetOrigin([float(v) for v in image.GetOrigin()])
    out.SetSpacing([float(v) for v in image.GetSpacing()])
    out.SetDirection(itk.matrix_from_array(direction_matrix(image)))
    return out


def _mask_to_itk(mask: sitk.Image) -> itk.Image:
    binary = (sitk.GetArrayViewFromImage(mask) != 0).astype(np.uint8)
    out = itk.image_from_array(np.ascontiguousarray(binary))
    out.SetOrigin([float(v) for v in mask.GetOrigin()])
    out.SetSpacing([float(v) for v in mask.GetSpacing()])
    out.SetDirection(itk.matrix_from_array(direction_matrix(mask)))
    return out


def itk_field_to_sitk(field, reference: sitk.Image, tol: float = 1e-3) -> sitk.Image:
    """transformix's deformation field (ITK vector image) as a ``sitkVectorFloat64`` image on ``reference``'s grid.

    The ITK image's geometry must match ``reference`` (the fixed image); the voxel data is
    copied and the geometry taken from ``reference`` so that it is bit-identical to the fixed grid.
    """
    size = tuple(int(s) for s in itk.size(field))
    origin = np.array(itk.origin(field), dtype=np.float64)
    spacing = np.array(itk.spacing(field), dtype=np.float64)
    direction = np.array(itk.array_from_matrix(field.GetDirection()), dtype=np.float64)
    if (
        size != tuple(reference.GetSize())
        or not np.allclose(origin, reference.GetOrigin(), atol=tol)
        or not np.allclose(spacing, reference.GetSpacing(), atol=tol)
        or not np.allclose(direction.ravel(), reference.GetDirection(), atol=1e-6)
    ):
        raise RuntimeError(
            f"transformix returned a field on another grid (size {size}, origin {origin.tolist()}, "
            f"spacing {spacing.tolist()}) than the fixed image"
        )
    arr = np.asarray(itk.array_from_image(field), dtype=np.float64)  # (z, y, x, 3), LPS mm
    out = sitk.GetImageFromArray(arr, isVector=True)
    out.CopyInformation(reference)
    return out


# ------------------------------------------------------------------ linear transforms
def elastix_linear_to_sitk(pmap: Mapping[str, Sequence[str]]) -> sitk.Transform:
    """The sitk transform (fixed -> moving) of a linear elastix TransformParameters map.

    Elastix maps fixed point x to ``A (x - c) + t + c`` with ``c`` = CenterOfRotationPoint; its
    AffineTransform parameters are A row by row (9 values) followed by t (3), EulerTransform
    parameters are the rotation angles (x, y, z, radians) and t, SimilarityTransform ones the
    versor (3), t and the scale, TranslationTransform ones t.
    """
    kind = pmap["Transform"][0]
    params = [float(v) for v in pmap["TransformParameters"]]
    center = [float(v) for v in pmap.get("CenterOfRotationPoint", ["0", "0", "0"])]
    if _LINEAR.get(kind) != len(params):
        raise RuntimeError(f"cannot convert elastix {kind} with {len(params)} parameters to a SimpleITK transform")
    if kind == "TranslationTransform":
        affine = sitk.AffineTransform(3)
        affine.SetTranslation(params)
        return affine
    if kind == "EulerTransform":
        euler = sitk.Euler3DTransform()
        euler.SetCenter(center)
        euler.SetComputeZYX(pmap.get("ComputeZYX", ["false"])[0] == "true")
        euler.SetRotation(*params[:3])
        euler.SetTranslation(params[3:6])
        transform: sitk.Transform = euler
    elif kind == "SimilarityTransform":
        similarity = sitk.Similarity3DTransform()
        similarity.SetCenter(center)
        similarity.SetParameters(params)
        transform = similarity
    else:
        affine = sitk.AffineTransform(3)
        affine.SetCenter(center)
        affine.SetMatrix(params[:9])
        affine.SetTranslation(params[9:12])
        return affine
    affine = sitk.AffineTransform(3)
    affine.SetCenter(center)
    affine.SetMatrix(transform.GetMatrix())
    affine.SetTranslation(transform.GetTranslation())
    return affine


def _compose_linear(first: sitk.AffineTransform, second: sitk.AffineTransform) -> sitk.AffineTransform:
    """x -> second(first(x)) as one AffineTransform."""
    a1, a2 = np.array(first.GetMatrix()).reshape(3, 3), np.array(second.GetMatrix()).reshape(3, 3)
    o1 = np.array(first.TransformPoint((0.0, 0.0, 0.0)))
    out = sitk.AffineTransform(3)
    out.SetMatrix((a2 @ a1).ravel().tolist())
    out.SetTranslation(second.TransformPoint(o1.tolist()))
    return out


def leading_affine(pmaps: Sequence[Mapping[str, Sequence[str]]]) -> sitk.AffineTransform | None:
    """The composition of the linear stages before the first non-linear one (``None`` if there are none).

    Elastix composes stages (HowToCombineTransforms "Compose"): a later stage acts on the output
    of the earlier ones, ``T(x) = T_later(T_earlier(x))``.
    """
    affine = None
    for pmap in pmaps:
        if pmap["Transform"][0] not in _LINEAR:
            break
        if pmap.get("HowToCombineTransforms", ["Compose"])[0] != "Compose":
            break
        stage = elastix_linear_to_sitk(pmap)
        affine = stage if affine is None else _compose_linear(affine, stage)
    return affine


def linear_to_parameter_map(transform: sitk.Transform, fixed: sitk.Image) -> dict[str, list[str]]:
    """An elastix ``AffineTransform`` TransformParameters map equal to a linear sitk transform (fixed -> moving).

    The inverse of :func:`elastix_linear_to_sitk`: elastix maps ``x`` to ``A (x - c) + t + c``,
    parameters A row by row then t, ``c`` = CenterOfRotationPoint. The map carries the fixed
    image's geometry (elastix writes ``Direction`` column by column), so it can serve as an
    initial transform of a registration or as a stage of a transformix chain.
    """
    if transform.GetDimension() != 3:
        raise InputError(f"initial transform is {transform.GetDimension()}D; a 3D linear transform is required")
    if type(transform) is sitk.Transform and hasattr(transform, "Downcast"):
        transform = transform.Downcast()
    if transform.GetName() not in _SITK_LINEAR:
        raise InputError(f"initial transform {transform.GetName()} is not linear; give an affine, rigid or translation")
    matrix = linear_to_matrix(transform)
    center = np.zeros(3)
    if hasattr(transform, "GetCenter"):
        center = np.array(transform.GetCenter(), dtype=np.float64)
    a = matrix[:3, :3]
    t = matrix[:3, 3] + a @ center - center  # A (x - c) + t + c == A x + offset
    direction = direction_matrix(fixed)

    def nums(values) -> list[str]:
        return [repr(float(v)) for v in values]

    return {
        "Transform": ["AffineTransform"],
        "NumberOfParameters": ["12"],
        "TransformParameters": nums(list(a.ravel()) + list(t)),
        "CenterOfRotationPoint": nums(center),
        "InitialTransformParameterFileName": ["NoInitialTransform"],
        "HowToCombineTransforms": ["Compose"],
        "FixedImageDimension": ["3"],
        "MovingImageDimension": ["3"],
        "FixedInternalImagePixelType": ["float"],
        "MovingInternalImagePixelType": ["float"],
        "Size": [str(int(v)) for v in fixed.GetSize()],
        "Index": ["0", "0", "0"],
        "Spacing": nums(fixed.GetSpacing()),
        "Origin": nums(fixed.GetOrigin()),
        "Direction": nums(direction.T.ravel()),
        "UseDirectionCosines": ["true"],
        "ResampleInterpolator": ["FinalBSplineInterpolator"],
        "FinalBSplineInterpolationOrder": ["3"],
        "Resampler": ["DefaultResampler"],
        "DefaultPixelValue": [repr(float(AIR_HU))],
        "ResultImageFormat": ["nii"],
        "ResultImagePixelType": ["float"],
        "CompressResultImage": ["false"],
    }


#: elastix's name of the point-correspondence metric
POINTS_METRIC = "CorrespondingPointsEuclideanDistanceMetric"


def add_points_metric(pmap: dict[str, list[str]], weights: float | Sequence[float]) -> int:
    """Append :data:`POINTS_METRIC` to a stage's metrics, with its weight per resolution; return its index.

    The stage must use ``MultiMetricMultiResolutionRegistration``. Elastix reads ``Metric<i>Weight``
    (or ``Metric<i>RelativeWeight`` when ``UseRelativeWeights`` is true, as in the regsam presets)
    once per resolution level, so ``weights`` may hold one value per resolution (a single value
    applies to all). With relative weights, the points' gradient is rescaled every iteration to
    ``weight`` times the magnitude of metric 0's (the image similarity's) gradient.
    """
    if pmap.get("Registration", [""])[0] != "MultiMetricMultiResolutionRegistration":
        raise InputError(
            f"corresponding points need (Registration \"MultiMetricMultiResolutionRegistration\") in the "
            f"{pmap['Transform'][0]} stage, it has {pmap.get('Registration', ['(none)'])[0]}"
        )
    levels = int(pmap.get("NumberOfResolutions", ["1"])[0])
    values = [float(w) for w in (weights if isinstance(weights, (list, tuple)) else [weights])]
    if len(values) == 1:
        values = values * levels
    if len(values) != levels or not all(np.isfinite(values)) or any(v < 0 for v in values):
        raise InputError(
            f"points weights: expected 1 or {levels} finite values >= 0 (one per resolution), got {values}"
        )
    metrics = list(pmap.get("Metric", []))
    if POINTS_METRIC in metrics:
        raise InputError(f"the {pmap['Transform'][0]} stage already has a {POINTS_METRIC}")
    index = len(metrics)
    pmap["Metric"] = metrics + [POINTS_METRIC]
    pmap[_weight_key(pmap, index)] = [repr(v) for v in values]
    return index


def _weight_key(pmap: Mapping[str, Sequence[str]], index: int) -> str:
    relative = pmap.get("UseRelativeWeights", ["false"])[0] == "true"
    return f"Metric{index}{'Relative' if relative else ''}Weight"


# ------------------------------------------------------------------ running elastix
def _first_line(exc: BaseException) -> str:
    text = str(exc)
    match = re.search(r"Description:\s*(.+)", text)
    if match:
        return match.group(1).strip()[:200]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:200]


def _log_error(log: str) -> str | None:
    """The error line of an elastix log (its exception's ``Description:``), less ITK's ``ITK ERROR: Class(0x..):``."""
    match = re.findall(r"Description:\s*(.+)", log)
    if not match:
        return None
    line = re.sub(r"^ITK ERROR:\s*", "", match[-1].strip())
    return re.sub(r"^(\w+)\(0x[0-9a-fA-F]+\):\s*", r"\1: ", line)[:300]


def _read_log(stage_dir: Path) -> str:
    path = stage_dir / "elastix.log"
    return path.read_text(errors="replace") if path.is_file() else ""


def _estimate_diverged(pmap: Mapping[str, Sequence[str]], log: str) -> bool:
    """True if a stage failed because ASGD's displacement-distribution step size threw all samples out of the image."""
    return (
        pmap.get("Optimizer", [""])[0] == "AdaptiveStochasticGradientDescent"
        and pmap.get("ASGDParameterEstimationMethod", ["Original"])[0] == "DisplacementDistribution"
        and "Too many samples map outside moving image buffer" in log
        and "1:ItNr" in log  # it failed while iterating, not before
    )


def _starts_at_optimum(log: str) -> bool:
    """True if the log's first iteration has a zero metric gradient (``||Gradient||`` column): nothing to optimise."""
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("1:ItNr"):
            header = line.split("\t")
            column = next((k for k, name in enumerate(header) if name == "4:||Gradient||"), None)
            if column is None or i + 1 >= len(lines):
                return False
            row = lines[i + 1].split("\t")
            try:
                return float(row[column]) == 0.0
            except (IndexError, ValueError):
                return False
    return False


def _final_metric(log: str) -> float | None:
    values = re.findall(r"Final metric value\s*=\s*([-+0-9.eE]+)", log)
    try:
        return float(values[-1]) if values else None
    except ValueError:
        return None


def _parameter_object(pmaps: Sequence[Mapping[str, Sequence[str]]]):
    po = itk.ParameterObject.New()
    for pmap in pmaps:
        po.AddParameterMap({k: tuple(v) for k, v in pmap.items()})
    return po


def _maps_of(parameter_object) -> list[dict[str, list[str]]]:
    return [
        {str(k): [str(v) for v in vals] for k, vals in dict(parameter_object.GetParameterMap(i)).items()}
        for i in range(parameter_object.GetNumberOfParameterMaps())
    ]


def transform_parameter_files(pmaps: Sequence[Mapping[str, Sequence[str]]]) -> dict[str, str]:
    """File name -> text of chained TransformParameters files (``TransformParameters.{i}.txt``).

    Map ``i`` names ``TransformParameters.{i-1}.txt`` as its initial transform, so that the
    command-line ``transformix -tp TransformParameters.{last}.txt`` works inside the folder.
    """
    files = {}
    for i, pmap in enumerate(pmaps):
        pmap = {k: list(v) for k, v in pmap.items()}
        pmap["InitialTransformParameterFileName"] = [f"TransformParameters.{i - 1}.txt" if i else "NoInitialTransform"]
        files[f"TransformParameters.{i}.txt"] = format_parameter_map(pmap)
    return files


def read_transform_parameter_object(folder: str | os.PathLike):
    """An ``itk.ParameterObject`` from the ``TransformParameters.{i}.txt`` files in ``folder`` (in order)."""
    folder = Path(folder)
    files = sorted(folder.glob("TransformParameters.*.txt"), key=lambda p: int(p.name.split(".")[1]))
    if not files:
        raise InputError(f"{folder}: no TransformParameters.*.txt files")
    po = itk.ParameterObject.New()
    po.ReadParameterFiles([str(f) for f in files])
    return po


def transformix_points(parameter_object, moving: sitk.Image, points: np.ndarray) -> np.ndarray:
    """Map fixed points (N, 3 mm) to moving space with transformix (an independent check of the field)."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    with tempfile.TemporaryDirectory(prefix="regsam-transformix-") as tmp:
        point_file = Path(tmp) / "fixed_points.txt"
        point_file.write_text("point\n" + f"{len(pts)}\n" + "".join(f"{x:.9f} {y:.9f} {z:.9f}\n" for x, y, z in pts))
        tf = itk.TransformixFilter.New(sitk_to_itk(moving))
        tf.SetTransformParameterObject(parameter_object)
        tf.SetFixedPointSetFileName(str(point_file))
        tf.SetOutputDirectory(tmp)
        tf.SetLogToConsole(False)
        tf.UpdateLargestPossibleRegion()
        text = (Path(tmp) / "outputpoints.txt").read_text()
    out = [
        [float(v) for v in match.split()]
        for match in re.findall(r"OutputPoint\s*=\s*\[\s*([^\]]+)\]", text)
    ]
    return np.array(out, dtype=np.float64).reshape(-1, 3)


# ------------------------------------------------------------------ registration: setup
@dataclass
class _Plan:
    """What the setup of one elastix registration decides: the stages' parameter maps and what they get added."""

    label: str  # the preset's name, or "custom" for the caller's parameter files
    preset_values: dict[str, Any] | None
    files: list[Path]
    pmaps: list[dict[str, list[str]]]
    names: list[str]
    points: tuple[np.ndarray, np.ndarray, set[str]] | None = None  # fixed, moving, the stages that use them
    points_weights: dict[str, list[float]] = field(default_factory=dict)  # stage -> weight per resolution

    def stages(self) -> list[Stage]:
        """One :class:`_ElastixStage` per parameter map, in order."""
        return [_ElastixStage(n, m, f, i) for i, (m, n, f) in enumerate(zip(self.pmaps, self.names, self.files))]


def _plan_stages(
    preset: str | None,
    parameter_files: Sequence[str | os.PathLike] | None,
    overrides: Mapping[str, object] | None,
    stage_overrides: Mapping[str, Mapping[str, object]] | None,
    stages: Sequence[str] | str | None,
    seed: int | None,
) -> _Plan:
    """The parameter maps to run, one per stage, with the stage selection and the overrides applied."""
    if parameter_files and preset is not None:
        raise InputError("give either an elastix preset or parameter_files, not both")
    preset_values: dict | None = None
    if parameter_files:
        files = [Path(p) for p in parameter_files]
        label = "custom"
    else:
        label, chosen = choose_preset(PRESETS, preset, DEFAULT_PRESET, "elastix")
        files = chosen.paths
        preset_values = preset_settings(chosen)
    pmaps = [read_parameter_map(f) for f in files]
    names: list[str] = []
    for pmap in pmaps:
        names.append(_stage_name(pmap, set(names)))
    if stages is not None:
        # the one stage parser ("affine", "affine,bspline" or a list); imported here: regsam.register.sam
        # imports torch and the embedder, which an elastix run does not otherwise need
        from regsam.register.sam import parse_stages

        wanted = parse_stages(stages, names, "elastix")
        keep = [i for i, n in enumerate(names) if n in set(wanted)]
        pmaps, names, files = [pmaps[i] for i in keep], [names[i] for i in keep], [files[i] for i in keep]
    for key in stage_overrides or {}:
        if key not in names:
            raise InputError(f"stage_overrides: unknown stage '{key}' (stages: {', '.join(names)})")
    for pmap, name in zip(pmaps, names):
        for key, value in (overrides or {}).items():
            pmap[str(key)] = _values(value)
        for key, value in ((stage_overrides or {}).get(name) or {}).items():
            pmap[str(key)] = _values(value)
        if seed is not None:
            pmap["RandomSeed"] = [str(int(seed))]
    return _Plan(label, preset_values, files, pmaps, names)


def _plan_points(
    plan: _Plan,
    corresponding_points: tuple[np.ndarray, np.ndarray] | None,
    points_weights: float | Sequence[float],
    points_stages: Sequence[str] | None,
) -> None:
    """Add the points metric to the stages that get the corresponding points (default: the B-spline ones)."""
    if corresponding_points is None:
        return
    fixed_pts = as_points(corresponding_points[0], "fixed corresponding points")
    moving_pts = as_points(corresponding_points[1], "moving corresponding points")
    if len(fixed_pts) != len(moving_pts) or len(fixed_pts) == 0:
        raise InputError(
            f"corresponding points: {len(fixed_pts)} fixed and {len(moving_pts)} moving points; "
            "need the same number, at least one"
        )
    names = plan.names
    targets = list(points_stages) if points_stages is not None else [
        n for n, m in zip(names, plan.pmaps) if m["Transform"][0] in ("BSplineTransform", "RecursiveBSplineTransform")
    ]
    unknown = [t for t in targets if t not in names]
    if unknown or not targets:
        raise InputError(
            f"points_stages: unknown or no stage(s) {', '.join(unknown) or '(none)'} (stages: {', '.join(names)})"
        )
    for pmap, name in zip(plan.pmaps, names):
        if name in targets:
            key = _weight_key(pmap, add_points_metric(pmap, points_weights))
            plan.points_weights[name] = [float(v) for v in pmap[key]]
    plan.points = (fixed_pts, moving_pts, set(targets))


# ------------------------------------------------------------------ registration: stages
@dataclass
class _ElastixState:
    """One elastix registration while its stages run in the temporary ``folder``: images, transform so far, outputs."""

    fixed_itk: Any
    moving_itk: Any
    fixed_mask_itk: Any
    moving_mask_itk: Any
    folder: Path
    keep_logs: bool
    timings: dict[str, float]
    transform_object: Any = None  # itk.ParameterObject of every map so far (the initial ones first); None: identity
    point_files: tuple[Path, Path] | None = None  # fixed, moving (elastix ``point`` files)
    point_stages: set[str] = field(default_factory=set)
    artifacts: dict[str, str] = field(default_factory=dict)
    stage_info: list[dict[str, Any]] = field(default_factory=list)


def _write_point_files(state: _ElastixState, points: tuple[np.ndarray, np.ndarray, set[str]]) -> None:
    fixed_point_file = write_elastix_points(points[0], state.folder / "fixed_points.txt")
    moving_point_file = write_elastix_points(points[1], state.folder / "moving_points.txt")
    state.artifacts["elastix/fixed_points.txt"] = fixed_point_file.read_text()
    state.artifacts["elastix/moving_points.txt"] = moving_point_file.read_text()
    state.point_files, state.point_stages = (fixed_point_file, moving_point_file), points[2]


def _run_elastix(state: _ElastixState, pmap: Mapping[str, Sequence[str]], name: str, stage_dir: Path):
    """One elastix stage from the current transform; ``(registration, None)`` or ``(None, error text)``."""
    stage_dir.mkdir()
    reg = itk.ElastixRegistrationMethod.New(state.fixed_itk, state.moving_itk)
    reg.SetParameterObject(_parameter_object([pmap]))
    if state.point_files is not None and name in state.point_stages:
        reg.SetFixedPointSetFileName(str(state.point_files[0]))
        reg.SetMovingPointSetFileName(str(state.point_files[1]))
    if state.fixed_mask_itk is not None:
        reg.SetFixedMask(state.fixed_mask_itk)
    if state.moving_mask_itk is not None:
        reg.SetMovingMask(state.moving_mask_itk)
    if state.transform_object is not None:
        reg.SetInitialTransformParameterObject(state.transform_object)
    reg.SetOutputDirectory(str(stage_dir))
    reg.SetLogToConsole(False)
    reg.SetLogToFile(True)
    reg.SetLogFileName("elastix.log")
    try:
        reg.UpdateLargestPossibleRegion()
    except RuntimeError as exc:
        return None, _first_line(exc)
    return reg, None


class _Outcome(NamedTuple):
    registration: Any  # None when the stage was left out
    pmap: Mapping[str, Sequence[str]]  # the map that ran (the retry's, if retried)
    log: str
    skipped: str | None
    retried: dict[str, list[str]] | None


@dataclass
class _ElastixStage:
    """One parameter map, run by elastix from the current transform (a :class:`~regsam.register.stages.Stage`).

    It clocks itself (``timings[name]``) because its record in ``stage_info`` holds its seconds.
    """

    name: str
    pmap: dict[str, list[str]]
    parameter_file: Path
    index: int

    def run(self, state: _ElastixState) -> None:
        with timed(state.timings, self.name):
            outcome = self._run_with_retry(state)
        if outcome.registration is not None:
            # The result object holds the initial maps followed by this stage's map.
            state.transform_object = outcome.registration.GetTransformParameterObject()
        if state.keep_logs and outcome.log:
            state.artifacts[f"elastix/elastix_{self.name}.log"] = outcome.log
        state.stage_info.append(
            {
                "name": self.name,
                "transform": outcome.pmap["Transform"][0],
                "parameter_file": str(self.parameter_file),
                "final_metric": _final_metric(outcome.log),
                "metrics": list(outcome.pmap.get("Metric", [])),
                "seconds": round(state.timings[self.name], 3),
                "skipped": outcome.skipped,
                "retried_with": outcome.retried,
            }
        )

    def _run_with_retry(self, state: _ElastixState) -> _Outcome:
        """Run the stage; left out if it starts at the optimum, retried once if ASGD's step estimate diverged."""
        pmap: Mapping[str, Sequence[str]] = self.pmap
        stage_dir = state.folder / f"{self.index}_{self.name}"
        reg, error = _run_elastix(state, pmap, self.name, stage_dir)
        log = _read_log(stage_dir)
        skipped = retried = None
        if reg is None and _starts_at_optimum(log):
            skipped = "zero metric gradient at the first iteration: already aligned, stage left out (identity)"
        elif reg is None and _estimate_diverged(pmap, log):
            # ASGD's "DisplacementDistribution" step size divides by the gradient at the start; near an
            # optimum (an image and a noisy copy of it) that step throws every sample out of the image.
            # The "Original" estimate does not depend on that gradient's size.
            retried = {"ASGDParameterEstimationMethod": ["Original"]}
            pmap = {**pmap, **retried}
            stage_dir = state.folder / f"{self.index}_{self.name}_retry"
            reg, error = _run_elastix(state, pmap, self.name, stage_dir)
            log = _read_log(stage_dir)
        if reg is None and skipped is None:
            raise RuntimeError(f"elastix {self.name} stage failed: {_log_error(log) or error}")
        return _Outcome(reg, pmap, log, skipped, retried)


# ------------------------------------------------------------------ registration: field and result
def _deformation_field(state: _ElastixState, fixed: sitk.Image, final_maps: Sequence[object]) -> sitk.Image:
    """transformix's deformation field of the final transform (``final_maps``) on the fixed grid."""
    if not final_maps:  # every stage was left out (already aligned): the identity
        displacement = sitk.Image(fixed.GetSize(), sitk.sitkVectorFloat64, 3)
        displacement.CopyInformation(fixed)
        return displacement
    tf = itk.TransformixFilter.New(state.moving_itk)
    tf.SetTransformParameterObject(state.transform_object)
    tf.ComputeDeformationFieldOn()
    tf.SetOutputDirectory(str(state.folder))
    tf.SetLogToConsole(False)
    try:
        tf.UpdateLargestPossibleRegion()
    except RuntimeError as exc:
        raise RuntimeError(f"transformix failed: {_first_line(exc)}") from None
    return itk_field_to_sitk(tf.GetOutputDeformationField(), fixed)


def _elastix_extras(
    plan: _Plan,
    state: _ElastixState,
    final_maps: Sequence[Mapping[str, Sequence[str]]],
    overrides: Mapping[str, object] | None,
    stage_overrides: Mapping[str, Mapping[str, object]] | None,
    seed: int | None,
    inputs: Mapping[str, bool],
) -> dict[str, Any]:
    """``extras["elastix"]`` of the result; ``inputs``: whether an initial transform and each mask were given."""
    bspline = ("BSplineTransform", "RecursiveBSplineTransform")
    grid = next((m.get("GridSize") for m in final_maps if m["Transform"][0] in bspline), None)
    return {
        "stages": state.stage_info,
        "bspline_grid_size": [int(g) for g in grid] if grid else None,
        "overrides": {str(k): _values(v) for k, v in (overrides or {}).items()},
        "stage_overrides": {
            s: {str(k): _values(v) for k, v in o.items()} for s, o in (stage_overrides or {}).items()
        },
        "preset_settings": plan.preset_values,
        "seed": seed,
        "initial_transform": inputs["initial_transform"],
        "corresponding_points": None if plan.points is None else {
            "count": int(len(plan.points[0])),
            "stages": sorted(plan.points[2]),
            "metric": POINTS_METRIC,
            "weights": plan.points_weights,
        },
        "fixed_mask": inputs["fixed_mask"],
        "moving_mask": inputs["moving_mask"],
        "itk_elastix": _itk_elastix_version(),
    }


def _as_float32(image: sitk.Image) -> sitk.Image:
    return sitk.Cast(image, sitk.sitkFloat32) if image.GetPixelID() != sitk.sitkFloat32 else image


def register_elastix(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    preset: str | None = None,
    fixed_mask: sitk.Image | None = None,
    moving_mask: sitk.Image | None = None,
    parameter_files: Sequence[str | os.PathLike] | None = None,
    overrides: Mapping[str, object] | None = None,
    stage_overrides: Mapping[str, Mapping[str, object]] | None = None,
    stages: Sequence[str] | str | None = None,
    seed: int | None = None,
    keep_logs: bool = True,
    initial_transform: sitk.Transform | None = None,
    corresponding_points: tuple[np.ndarray, np.ndarray] | None = None,
    points_weights: float | Sequence[float] = 0.1,
    points_stages: Sequence[str] | None = None,
) -> RegistrationResult:
    """Register ``moving`` onto ``fixed`` with elastix; the images are assumed validated (see ``api.register``).

    Args:
        preset: ``lung`` (default) or ``fast``; ignored when ``parameter_files`` is given.
        fixed_mask, moving_mask: optional masks on the grids of their images (non-zero inside);
            elastix draws its samples inside them (``ErodeMask`` false in the presets).
        parameter_files: your own elastix parameter files, one per stage, instead of a preset.
        overrides: parameter -> value(s) set in every stage, e.g. ``{"MaximumNumberOfIterations": 200}``.
        stage_overrides: stage name (``affine``, ``bspline`` ...) -> overrides for that stage only.
        stages: run only these stages (by name), e.g. ``("affine",)`` or ``"affine,bspline"``.
        seed: elastix ``RandomSeed`` of the random samplers (default: the files' value).
        keep_logs: keep the elastix logs as result artifacts (``elastix/elastix_<stage>.log``).
        initial_transform: a linear transform (fixed -> moving, mm) to start from; it is the first
            map of the result's TransformParameters files and part of ``affine`` and the field.
            Leave out the preset's own linear stages with ``stages`` if it replaces them.
        corresponding_points: ``(fixed_points, moving_points)``, (N, 3) mm each, row i with row i:
            added to ``points_stages`` as :data:`POINTS_METRIC` (see :func:`add_points_metric`).
        points_weights: the points metric's (relative) weight, one value or one per resolution.
        points_stages: stage names that get the points metric (default: the B-spline stages).

    Returns:
        RegistrationResult with method ``"elastix"``, timings per stage (plus ``field`` and
        ``warp``), the leading linear stages as ``affine``, and ``extras["elastix"]`` with the
        stages, their final metric values, the parameter files and the itk-elastix version.
    """
    start = time.perf_counter()
    timings: dict[str, float] = {}
    with timed(timings, "setup"):  # includes loading itk-elastix's modules on first use (~20 s per process)
        plan = _plan_stages(preset, parameter_files, overrides, stage_overrides, stages, seed)
        _plan_points(plan, corresponding_points, points_weights, points_stages)
        initial_maps = [linear_to_parameter_map(initial_transform, fixed)] if initial_transform is not None else []
    fixed_f, moving_f = _as_float32(fixed), _as_float32(moving)
    with timed(timings, "convert"):
        fixed_itk, moving_itk = sitk_to_itk(fixed_f), sitk_to_itk(moving_f)
        fixed_mask_itk = _mask_to_itk(fixed_mask) if fixed_mask is not None else None
        moving_mask_itk = _mask_to_itk(moving_mask) if moving_mask is not None else None

    with tempfile.TemporaryDirectory(prefix="regsam-elastix-") as tmp:
        state = _ElastixState(fixed_itk, moving_itk, fixed_mask_itk, moving_mask_itk, Path(tmp), keep_logs, timings,
                              transform_object=_parameter_object(initial_maps) if initial_maps else None)
        if plan.points is not None:
            _write_point_files(state, plan.points)
        for stage in plan.stages():  # each in turn, from the transform of the ones before
            stage.run(state)
        final_maps = _maps_of(state.transform_object) if state.transform_object is not None else []
        with timed(timings, "field"):
            displacement = _deformation_field(state, fixed, final_maps)

    for file_name, text in transform_parameter_files(final_maps).items():
        state.artifacts[f"elastix/{file_name}"] = text
    with timed(timings, "warp"):
        warped = warp_image(moving_f, fixed_f, displacement, "linear", AIR_HU)
    timings["total"] = time.perf_counter() - start
    given = {"initial_transform": initial_transform is not None, "fixed_mask": fixed_mask is not None,
             "moving_mask": moving_mask is not None}
    extras = {"elastix": _elastix_extras(plan, state, final_maps, overrides, stage_overrides, seed, given)}
    return RegistrationResult(
        displacement=displacement, warped=warped, method="elastix", preset=plan.label, timings=timings,
        affine=leading_affine(final_maps), extras=extras, artifacts=state.artifacts,
    )


def _itk_elastix_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("itk-elastix")
    except Exception:  # noqa: BLE001 - version lookup is informative only
        return None
