"""Look at simulated breathing pairs: coronal / sagittal / axial slices and the motion field.

Usage::

    python benchmarks/simulator_pictures.py                       # sample CT at 2 mm, parametric + DIR-Lab case 4
    python benchmarks/simulator_pictures.py --ct my_ct.nii.gz --spacing 1.5 --motions parametric

For every motion it writes into ``--out`` (default ``benchmarks/simulator``):

* ``<motion>_slices.png``: rows coronal / sagittal / axial through the lungs; columns fixed
  (simulated exhale), moving (source CT, inhale) and fixed - moving. Red: fixed lung outline,
  green: moving lung outline, on both images, so the diaphragm shift shows as the gap between them.
* ``<motion>_motion.png``: |u| (colour) with in-plane arrows on the fixed image (coronal and
  sagittal) and the Jacobian determinant of the field.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from regsam.data.fetch import fetch_sample_ct  # noqa: E402
from regsam.data.simulate import SimulationConfig, simulate_case  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DIRLAB = REPO.parent / "shared" / "data" / "dirlab4dct_landmarks"
DIRLAB_SPACING = {1: 0.97, 2: 1.16, 3: 1.15, 4: 1.13, 5: 1.10}


def _config(motion: str, args: argparse.Namespace) -> SimulationConfig:
    common = dict(seed=args.seed, spacing_mm=args.spacing, noise_hu=args.noise_hu, amplitude_mm=args.amplitude)
    if motion == "parametric":
        return SimulationConfig(motion="parametric", **common)
    case = int(motion.removeprefix("dirlab"))
    s = DIRLAB_SPACING[case]
    return SimulationConfig(
        motion="landmarks",
        motion_landmarks=(DIRLAB / f"Case{case}_300_T00_xyz.txt", DIRLAB / f"Case{case}_300_T50_xyz.txt"),
        motion_spacing=(s, s, 2.5),
        **common,
    )


def _slices(array: np.ndarray, centre: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """Coronal, sagittal, axial 2D slices of a (z, y, x[, c]) array, head up for the first two."""
    z, y, x = centre
    return {"coronal": array[:, y], "sagittal": array[:, :, x], "axial": array[z]}


def _aspect(view: str, spacing: tuple[float, float, float]) -> float:
    sx, sy, sz = spacing
    return {"coronal": sz / sx, "sagittal": sz / sy, "axial": sy / sx}[view]


def _show(ax, image, view, spacing, vmin=-1000, vmax=300, cmap="gray"):
    origin = "upper" if view == "axial" else "lower"
    return ax.imshow(image, cmap=cmap, vmin=vmin, vmax=vmax, origin=origin, aspect=_aspect(view, spacing), interpolation="nearest")


def _contour(ax, mask, view, colour):
    if mask.any():
        ax.contour(mask.astype(float), levels=[0.5], colors=colour, linewidths=0.7, origin="upper" if view == "axial" else "lower")


def _save(fig, path: Path) -> None:
    """Save as a 128-colour palette PNG (a quarter of the size of the RGBA one)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=55, format="png")
    buffer.seek(0)
    Image.open(buffer).convert("RGB").quantize(128).save(path, optimize=True)


def pictures(pair, name: str, out: Path) -> list[Path]:
    fixed = sitk.GetArrayFromImage(pair.fixed).astype(np.float32)
    moving = sitk.GetArrayFromImage(pair.moving).astype(np.float32)
    lung_f = sitk.GetArrayFromImage(pair.fixed_mask) > 0
    lung_m = sitk.GetArrayFromImage(pair.moving_mask) > 0
    disp = sitk.GetArrayFromImage(pair.gt_disp)
    jac = sitk.GetArrayFromImage(pair.jacobian)
    spacing = pair.fixed.GetSpacing()
    zz, yy, xx = np.nonzero(lung_m)
    # coronal through the lung centre, sagittal through the right lung (x < midline), axial at the lower third
    right = xx < np.median(xx)
    centre = (int(np.percentile(zz, 30)), int(np.median(yy)), int(np.median(xx[right])))
    views = ("coronal", "sagittal", "axial")
    written = []

    fig, axes = plt.subplots(3, 3, figsize=(10.5, 10.5))
    for r, view in enumerate(views):
        f, m = _slices(fixed, centre)[view], _slices(moving, centre)[view]
        lf, lm = _slices(lung_f, centre)[view], _slices(lung_m, centre)[view]
        for c, (img, title) in enumerate(((f, "fixed (simulated exhale)"), (m, "moving (source CT, inhale)"))):
            _show(axes[r, c], img, view, spacing)
            _contour(axes[r, c], lf, view, "red")
            _contour(axes[r, c], lm, view, "lime")
            axes[r, c].set_title(f"{view}: {title}", fontsize=8)
        _show(axes[r, 2], f - m, view, spacing, vmin=-400, vmax=400, cmap="RdBu_r")
        axes[r, 2].set_title(f"{view}: fixed - moving (HU, +-400)", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    meta = pair.meta
    fig.suptitle(
        f"{name}: lung |u| mean {meta['lung_mean_displacement_mm']:.1f} mm, max {meta['lung_max_displacement_mm']:.1f} mm, "
        f"min det J {meta['min_jacobian']:.2f}   (red: fixed lungs, green: moving lungs)",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path = out / f"{name}_slices.png"
    _save(fig, path)
    plt.close(fig)
    written.append(path)

    mag = np.linalg.norm(disp, axis=-1)
    vmax = float(np.percentile(mag[lung_f], 99.5)) if lung_f.any() else float(mag.max())
    fig, axes = plt.subplots(2, 2, figsize=(10, 9))
    for r, view in enumerate(("coronal", "sagittal")):
        f = _slices(fixed, centre)[view]
        u = _slices(disp, centre)[view]
        lf = _slices(lung_f, centre)[view]
        ax = axes[r, 0]
        _show(ax, f, view, spacing)
        im = ax.imshow(_slices(mag, centre)[view], cmap="jet", alpha=0.45, vmin=0, vmax=vmax, origin="lower",
                       aspect=_aspect(view, spacing), interpolation="nearest")
        _contour(ax, lf, view, "white")
        # in-plane arrows: horizontal = x (coronal) or y (sagittal), vertical = z; arrows in pixel units
        h_comp, h_sp = (0, spacing[0]) if view == "coronal" else (1, spacing[1])
        step_v = max(1, int(round(12.0 / spacing[2])))
        step_h = max(1, int(round(12.0 / h_sp)))
        vv, hh = np.mgrid[0 : u.shape[0] : step_v, 0 : u.shape[1] : step_h]
        uh = u[vv, hh, h_comp] / h_sp
        uv = u[vv, hh, 2] / spacing[2]
        ax.quiver(hh, vv, uh, uv, angles="xy", scale_units="xy", scale=0.5, color="white", width=0.004)
        ax.set_title(f"{view}: |u| (mm) + arrows fixed->moving (2x length)", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.04)
        ax = axes[r, 1]
        im = _show(ax, _slices(jac, centre)[view], view, spacing, vmin=0.7, vmax=1.3, cmap="RdBu_r")
        _contour(ax, lf, view, "black")
        ax.set_title(f"{view}: det J (min {meta['min_jacobian']:.2f})", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.04)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    uz = meta["lung_mean_abs_uz_mm"]
    fig.suptitle(
        f"{name}: mean |u_z| in lungs: inferior third {uz['inferior_third']:.1f} mm, superior third {uz['superior_third']:.1f} mm",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path = out / f"{name}_motion.png"
    _save(fig, path)
    plt.close(fig)
    written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", default=None, help="CT to simulate from (default: the sample CT with its labels)")
    parser.add_argument("--labels", default=None)
    parser.add_argument("--spacing", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise-hu", type=float, default=20.0)
    parser.add_argument("--amplitude", type=float, default=None)
    parser.add_argument("--motions", nargs="+", default=["parametric", "dirlab4"], help="parametric and/or dirlab1..dirlab5")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "simulator"))
    args = parser.parse_args(argv)

    if args.ct is None:
        paths = fetch_sample_ct()
        ct_path, labels_path = paths["ct"], paths["labels"]
    else:
        ct_path, labels_path = Path(args.ct), (Path(args.labels) if args.labels else None)
    ct = sitk.ReadImage(str(ct_path))
    labels = sitk.ReadImage(str(labels_path)) if labels_path else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for motion in args.motions:
        t0 = time.perf_counter()
        pair = simulate_case(ct, _config(motion, args), labels)
        m = pair.meta
        print(
            f"{motion}: {time.perf_counter() - t0:.1f} s, lung |u| mean {m['lung_mean_displacement_mm']:.2f} max "
            f"{m['lung_max_displacement_mm']:.2f} mm, min det J {m['min_jacobian']:.3f}, identity TRE {m['mean_identity_tre_mm']:.2f} mm"
        )
        for path in pictures(pair, motion, out):
            print(f"  wrote {path} ({path.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
