"""Standard benchmark inputs: simulated 4DCT pairs and the public datasets.

``sim4dct`` is built once from the sample CT (or from CTs the user names, e.g. scans an
embedder never saw) and cached: five breathing pairs per CT, each driven by the motion of
one DIR-Lab 4DCT case (1-5) when the DIR-Lab landmark files are available, otherwise by the
parametric breathing model with the same five amplitudes.

``thorax4dct`` is the users' case: full-chest CTs at their native in-plane resolution (slices
resampled to the 2.5 mm of a 4DCT), large breathing motion (15-40 mm at the lung base: DIR-Lab
cases fitted to the CT's lungs and amplified, and the parametric model), lungs that slide along
the chest wall, and 30 mm / 10 deg offset twins of two pairs. Its default CT is
``lidc_idri_0314_chest`` from ``../shared/data/ct_more``, which is held out of every training set.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

from regsam.data.fetch import cache_root, fetch_sample_ct
from regsam.data.prepare import prepare_dataset
from regsam.data.simulate import SimulationConfig, simulate_case_from_file
from regsam.errors import InputError

#: DIR-Lab 4DCT cases 1-5: in-plane spacing (mm; z is 2.5) and published mean landmark motion (mm).
DIRLAB_MOTIONS = {
    1: ((0.97, 0.97, 2.5), 3.89),
    2: ((1.16, 1.16, 2.5), 4.34),
    3: ((1.15, 1.15, 2.5), 6.94),
    4: ((1.13, 1.13, 2.5), 9.83),
    5: ((1.10, 1.10, 2.5), 7.48),
}
SIM4DCT_VERSION = "v1"
SIM4DCT_SPACING_MM = 2.0

THORAX4DCT_VERSION = "v1"
#: slice spacing of the thorax pairs (mm), as in DIR-Lab 4DCT; the in-plane spacing stays the CT's own
THORAX4DCT_SLICE_MM = 2.5
#: (pair name, DIR-Lab case driving it or None for the parametric model, peak head-feet lung motion mm, offset twin)
THORAX4DCT_MOTIONS: tuple[tuple[str, int | None, float, bool], ...] = (
    ("dirlab1_22mm", 1, 22.0, False),
    ("dirlab3_30mm", 3, 30.0, True),
    ("dirlab4_38mm", 4, 38.0, False),
    ("parametric_28mm", None, 28.0, True),
)
THORAX4DCT_OFFSET = (30.0, 10.0)
HELD_OUT_CHEST = "lidc_idri_0314_chest.nii.gz"


def default_dirlab_landmarks_dir() -> Path | None:
    """Where DIR-Lab landmark files are looked for: ``$REGSAM_DIRLAB_LANDMARKS``, else ``../shared/data/dirlab4dct_landmarks`` from the cwd."""
    env = os.environ.get("REGSAM_DIRLAB_LANDMARKS")
    candidates = [Path(env)] if env else []
    candidates.append(Path.cwd().parent / "shared" / "data" / "dirlab4dct_landmarks")
    for candidate in candidates:
        if (candidate / "Case1_300_T00_xyz.txt").is_file():
            return candidate
    return None


def sim4dct_cases(
    cache_dir: str | os.PathLike | None = None,
    landmarks_dir: str | os.PathLike | None = None,
    cases: tuple[int, ...] = (1, 2, 3, 4, 5),
    spacing_mm: float = SIM4DCT_SPACING_MM,
    rigid_offset: tuple[float, float] | None = None,
    progress=None,
    source_cts: Sequence[str | os.PathLike] | None = None,
) -> list[Path]:
    """Build (once) and return the simulated 4DCT case folders.

    Args:
        landmarks_dir: folder with DIR-Lab ``CaseN_300_T00_xyz.txt``/``T50`` files driving the motion;
            default :func:`default_dirlab_landmarks_dir`; parametric motion when none is found.
        cases: which DIR-Lab cases (1-5) drive the motions, one pair per CT and case.
        rigid_offset: (mm, degrees) extra misalignment, giving the large-offset variant of the set.
        source_cts: CT files to simulate from (default: the sample CT, with its organ labels for the body
            points); case folders are named ``<ct name>_caseNN`` then, and cached per file content.
    """
    landmarks = Path(landmarks_dir) if landmarks_dir else default_dirlab_landmarks_dir()
    if landmarks_dir and not (Path(landmarks_dir) / "Case1_300_T00_xyz.txt").is_file():
        raise InputError(f"no DIR-Lab landmark files (Case1_300_T00_xyz.txt ...) in {landmarks_dir}")
    unknown = [c for c in cases if c not in DIRLAB_MOTIONS]
    if unknown or not cases:
        raise InputError(f"sim4dct cases must be among {sorted(DIRLAB_MOTIONS)}, got {list(cases)}")
    source = "dirlab" if landmarks else "parametric"
    offset_tag = f"_offset{rigid_offset[0]:g}mm{rigid_offset[1]:g}deg" if rigid_offset else ""
    root = cache_root(cache_dir) / f"sim4dct-{SIM4DCT_VERSION}-{source}-{spacing_mm:g}mm{offset_tag}"
    if source_cts:
        sources = [(_ct_tag(Path(ct)), Path(ct), None) for ct in source_cts]
    else:
        sample = fetch_sample_ct(cache_dir)
        sources = [("sim4dct", sample["ct"], sample["labels"])]
    folders = []
    for tag, ct_path, labels_path in sources:
        folders += _simulate_cases(root, tag, ct_path, labels_path, landmarks, cases, rigid_offset, spacing_mm, progress)
    return folders


def default_thorax_ct() -> Path | None:
    """The held-out full-chest CT: ``$REGSAM_THORAX_CT``, else ``../shared/data/ct_more/lidc_idri_0314_chest.nii.gz`` from the cwd."""
    env = os.environ.get("REGSAM_THORAX_CT")
    candidate = Path(env) if env else Path.cwd().parent / "shared" / "data" / "ct_more" / HELD_OUT_CHEST
    return candidate if candidate.is_file() else None


def thorax4dct_cases(
    cache_dir: str | os.PathLike | None = None,
    landmarks_dir: str | os.PathLike | None = None,
    source_cts: Sequence[str | os.PathLike] | None = None,
    motions: Sequence[str] | None = None,
    offsets: bool = True,
    progress=None,
) -> list[Path]:
    """Build (once) and return the full-thorax breathing pairs (see the module docstring).

    Args:
        landmarks_dir: DIR-Lab landmark folder (default :func:`default_dirlab_landmarks_dir`); without it
            the DIR-Lab-driven pairs are refused (the parametric pair needs none).
        source_cts: full-chest CTs (default :func:`default_thorax_ct`).
        motions: names from :data:`THORAX4DCT_MOTIONS` (default all).
        offsets: also build the 30 mm / 10 deg offset twins (folder names end in ``_offset``).
    """
    table = {name: (case, amp, twin) for name, case, amp, twin in THORAX4DCT_MOTIONS}
    wanted = list(motions) if motions else list(table)
    unknown = [m for m in wanted if m not in table]
    if unknown or not wanted:
        raise InputError(f"thorax4dct motions must be among {', '.join(table)}, got {', '.join(unknown) or '(none)'}")
    landmarks = Path(landmarks_dir) if landmarks_dir else default_dirlab_landmarks_dir()
    if any(table[m][0] is not None for m in wanted) and (landmarks is None or not (landmarks / "Case1_300_T00_xyz.txt").is_file()):
        raise InputError("thorax4dct needs the DIR-Lab landmark files (--landmarks DIR or $REGSAM_DIRLAB_LANDMARKS)")
    cts = [Path(ct) for ct in source_cts] if source_cts else [default_thorax_ct()]
    if cts[0] is None:
        raise InputError(f"no full-chest CT found for thorax4dct ({HELD_OUT_CHEST} in ../shared/data/ct_more); give --ct")
    root = cache_root(cache_dir) / f"thorax4dct-{THORAX4DCT_VERSION}"
    folders = []
    for ct in cts:
        tag = _ct_tag(ct)
        spacing = _thorax_spacing(ct)
        for seed, name in enumerate(wanted, start=1):
            case, amplitude, twin = table[name]
            for offset in ((None, THORAX4DCT_OFFSET) if twin and offsets else (None,)):
                folder = root / f"{tag}_{name}{'_offset' if offset else ''}"
                if not (folder / "meta.json").is_file():
                    if progress:
                        progress(f"simulating {folder.name} ...")
                    config = SimulationConfig(
                        seed=seed, motion="landmarks" if case else "parametric",
                        motion_landmarks=(landmarks / f"Case{case}_300_T00_xyz.txt", landmarks / f"Case{case}_300_T50_xyz.txt") if case else None,
                        motion_spacing=DIRLAB_MOTIONS[case][0] if case else None,
                        amplitude_mm=amplitude, rigid_offset=offset, spacing_mm=spacing, sliding=True,
                    )
                    simulate_case_from_file(ct, folder, config)
                folders.append(folder)
    return folders


def _thorax_spacing(ct: Path) -> tuple[float, float, float]:
    """The CT's own in-plane spacing and 4DCT slices (never finer than the CT's own slices)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(ct))
    reader.ReadImageInformation()
    sx, sy, sz = reader.GetSpacing()
    return float(sx), float(sy), max(float(sz), THORAX4DCT_SLICE_MM)


def _ct_tag(ct: Path) -> str:
    """A cache-safe name for a user CT: its stem plus a short hash of its content."""
    if not ct.is_file():
        raise InputError(f"CT not found: {ct}")
    digest = hashlib.sha256(ct.read_bytes()).hexdigest()[:8]
    stem = re.sub(r"[^A-Za-z0-9]+", "_", ct.name.split(".")[0]).strip("_") or "ct"
    return f"{stem}_{digest}"


def _simulate_cases(root, tag, ct_path, labels_path, landmarks, cases, rigid_offset, spacing_mm, progress) -> list[Path]:
    folders = []
    for case_id in cases:
        folder = root / f"{tag}_case{case_id:02d}"
        if not (folder / "meta.json").is_file():
            if progress:
                progress(f"simulating {folder.name} ({'dirlab' if landmarks else 'parametric'} motion) ...")
            spacing, mean_motion = DIRLAB_MOTIONS[case_id]
            config = SimulationConfig(
                seed=case_id,
                motion="landmarks" if landmarks else "parametric",
                motion_landmarks=(
                    (landmarks / f"Case{case_id}_300_T00_xyz.txt", landmarks / f"Case{case_id}_300_T50_xyz.txt")
                    if landmarks
                    else None
                ),
                motion_spacing=spacing if landmarks else None,
                amplitude_mm=None if landmarks else 2.0 * mean_motion,
                rigid_offset=rigid_offset,
                spacing_mm=spacing_mm,
            )
            simulate_case_from_file(ct_path, folder, config, body_label_image=labels_path)
        folders.append(folder)
    return folders


def prepared_cases(dataset: str, root: str | os.PathLike, out: str | os.PathLike) -> list[Path]:
    """Validate and convert a user's DIR-Lab 4DCT / COPDGene download into case folders under ``out/cases``."""
    cases = prepare_dataset(dataset, Path(root), Path(out) / "cases")
    return [case.path for case in cases]
