"""Point correspondences (fixed mm -> moving mm) and the grid points they start from."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from regsam.io.geometry import index_to_world


@dataclass
class Correspondences:
    """Matched point pairs: fixed (N, 3) mm -> moving (N, 3) mm, with score, cycle validity and affine inlier flags."""

    fixed: np.ndarray
    moving: np.ndarray
    score: np.ndarray
    valid: np.ndarray
    inlier: np.ndarray

    def to_csv(self) -> str:
        rows = ["fixed_x,fixed_y,fixed_z,moving_x,moving_y,moving_z,score,cycle_ok,affine_inlier"]
        for f, m, s, v, i in zip(self.fixed, self.moving, self.score, self.valid, self.inlier):
            rows.append(",".join(f"{c:.4f}" for c in (*f, *m)) + f",{s:.4f},{int(v)},{int(i)}")
        return "\n".join(rows) + "\n"


def grid_points_in_mask(mask: sitk.Image, spacing_mm: float) -> np.ndarray:
    """World points (N, 3) on a regular ``spacing_mm`` grid that fall inside ``mask`` (non-zero)."""
    array = sitk.GetArrayViewFromImage(mask)
    step = [max(1, int(round(spacing_mm / s))) for s in reversed(mask.GetSpacing())]  # z, y, x
    sub = array[:: step[0], :: step[1], :: step[2]]
    zyx = np.argwhere(sub > 0) * np.array(step)
    return index_to_world(mask, zyx[:, ::-1].astype(np.float64))
