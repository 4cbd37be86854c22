"""Dense, smooth displacement field from sparse (noisy, partly wrong) correspondences.

Given correspondences fixed ``x_i`` -> moving ``y_i`` (mm, world LPS) and an initial transform ``A``
(typically the RANSAC affine of :mod:`regsam.fit.affine`), the residuals
``r_i = y_i - A(x_i)`` are approximated by a smooth vector function ``r(x)`` and the result is
the field ``u(x) = A(x) + r(x) - x`` on the fixed grid, i.e. fixed ``x`` -> moving ``A(x) + r(x)``
(regsam's convention; ``sitk.Resample(moving, fixed, DisplacementFieldTransform(u))`` warps).

``r`` is a cubic tensor-product B-spline whose control lattice is aligned with the fixed grid
(control spacing ``grid_spacing_mm``), fitted by penalised weighted least squares (a P-spline):

    minimise   sum_i w_i |r(x_i) - r_i|^2 / sum_i w_i                     (mean squared misfit, mm^2)
             + smoothing_mm^4 * mean over the domain of |d^2 r / dx^2|^2      (thin-plate bending energy)
             + ridge * mean of the squared coefficients                    (tiny; keeps the system definite)

The bending term has no preferred value (linear trends pass unpenalised), so unlike a Gaussian
kernel average it does not shrink smooth deformations; roughly, wavelengths below
``2 * pi * smoothing_mm`` are damped. Robustness: a correspondence whose residual disagrees with
the median residual of its nearest neighbours starts with a low weight, and iteratively reweighted
least squares (Tukey biweight on the fit residual) then removes gross outliers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import SimpleITK as sitk
from scipy.linalg import cho_factor, cho_solve
from scipy.sparse.linalg import LinearOperator, cg
from scipy.spatial import cKDTree

from regsam.errors import InputError
from regsam.fit.affine import check_correspondences
from regsam.io.geometry import direction_matrix, grid_of
from regsam.io.transforms import transform_to_field

#: minimum number of correspondences (with positive weight) inside the reference grid
MIN_POINTS = 10


@dataclass
class SmoothFit:
    """A fitted smooth residual ``r(x)`` (see the module docstring).

    Attributes:
        coefficients: (3, Kz, Ky, Kx) B-spline coefficients (mm) of the world x, y, z components.
        reference: the grid the lattice is aligned with (an empty image carrying the fixed geometry).
        control_spacing_mm: (3,) lattice spacing along the grid's x, y, z axes (mm).
        weights: (N,) final robust weight of every correspondence (0 for points outside the grid).
        residuals_mm: (N,) ``|r(x_i) - r_i|`` after the fit (NaN for points outside the grid).
        used: (N,) bool, the correspondence lies inside the grid and took part in the fit.
        info: smoothing/grid settings and counts.
    """

    coefficients: np.ndarray
    reference: sitk.Image
    control_spacing_mm: np.ndarray
    weights: np.ndarray
    residuals_mm: np.ndarray
    used: np.ndarray
    info: dict = field(default_factory=dict)

    def evaluate(self, points: np.ndarray) -> np.ndarray:
        """r at world points (N, 3) mm -> (N, 3) mm (points outside the grid are clamped to its border)."""
        local = _local_mm(self.reference, np.asarray(points, dtype=np.float64).reshape(-1, 3))
        extent = _extent(self.reference)
        local = np.clip(local, 0.0, extent)
        b = _design(local, self.control_spacing_mm, self.coefficients.shape[1:][::-1])
        return np.stack([b @ self.coefficients[c].ravel() for c in range(3)], axis=1)

    def dense(self) -> np.ndarray:
        """r on every voxel of the reference grid: (D, H, W, 3) world mm components."""
        n = np.array(self.reference.GetSize())
        h = np.array(self.reference.GetSpacing())
        mats = [_basis_matrix(np.arange(n[a]) * h[a], self.control_spacing_mm[a], self.coefficients.shape[3 - a]) for a in range(3)]
        out = np.empty(tuple(n[::-1]) + (3,), dtype=np.float64)
        for c in range(3):
            coef = self.coefficients[c]  # (Kz, Ky, Kx)
            t = np.einsum("zyk,xk->zyx", coef, mats[0])
            t = np.einsum("zkx,yk->zyx", t, mats[1])
            out[..., c] = np.einsum("kyx,zk->zyx", t, mats[2])
        return out


# ------------------------------------------------------------------ B-spline machinery
def _extent(reference: sitk.Image) -> np.ndarray:
    return (np.array(reference.GetSize(), dtype=np.float64) - 1.0) * np.array(reference.GetSpacing())


def _local_mm(reference: sitk.Image, points: np.ndarray) -> np.ndarray:
    """World points -> mm along the grid's index axes x, y, z, measured from voxel 0."""
    return (points - np.array(reference.GetOrigin())) @ direction_matrix(reference)  # D^T (p - o): D orthonormal


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """(N,) fractional positions -> (N, 4) uniform cubic B-spline weights."""
    t2, t3 = t * t, t * t * t
    return np.stack(
        [(1 - t) ** 3 / 6.0, (3 * t3 - 6 * t2 + 4) / 6.0, (-3 * t3 + 3 * t2 + 3 * t + 1) / 6.0, t3 / 6.0], axis=1
    )


def _span(q: np.ndarray, g: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions q (mm from voxel 0) on a lattice of k controls at (j - 1) * g -> first control index, weights (N, 4)."""
    s = q / g
    i = np.clip(np.floor(s), 0, k - 4).astype(np.int64)
    return i, _cubic_weights(s - i)


def _basis_matrix(q: np.ndarray, g: float, k: int) -> np.ndarray:
    """Dense (len(q), k) 1D basis matrix."""
    i, w = _span(q, g, k)
    out = np.zeros((len(q), k))
    for j in range(4):
        np.add.at(out, (np.arange(len(q)), i + j), w[:, j])
    return out


def _design(local: np.ndarray, g: np.ndarray, k_xyz) -> sp.csr_matrix:
    """Sparse (N, Kz*Ky*Kx) design matrix of tensor-product cubic B-splines at local points (N, 3)."""
    kx, ky, kz = (int(v) for v in k_xyz)
    ix, wx = _span(local[:, 0], g[0], kx)
    iy, wy = _span(local[:, 1], g[1], ky)
    iz, wz = _span(local[:, 2], g[2], kz)
    rows, cols, vals = [], [], []
    n = len(local)
    for a in range(4):
        for b in range(4):
            for c in range(4):
                rows.append(np.arange(n))
                cols.append(((iz + a) * ky + (iy + b)) * kx + (ix + c))
                vals.append(wz[:, a] * wy[:, b] * wx[:, c])
    return sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, kx * ky * kz)
    )


def _diff(k: int, order: int) -> sp.csr_matrix:
    d = sp.eye(k, format="csr")
    for _ in range(order):
        d = (d[1:] - d[:-1]).tocsr()
    return d


def _bending_penalty(k_xyz, g: np.ndarray) -> sp.csr_matrix:
    """Quadratic form ~ integral of the thin-plate bending energy of the spline (per unit of cell volume)."""
    kx, ky, kz = (int(v) for v in k_xyz)
    eye = [sp.eye(kx), sp.eye(ky), sp.eye(kz)]

    def along(ops):  # ops: per-axis operators (x, y, z) -> operator on the raveled (z, y, x) coefficients
        return sp.kron(sp.kron(ops[2], ops[1]), ops[0]).tocsr()

    sizes = (kx, ky, kz)
    terms = []
    for a in range(3):
        ops = list(eye)
        ops[a] = _diff(sizes[a], 2) / g[a] ** 2
        terms.append((1.0, along(ops)))
        for b in range(a + 1, 3):
            ops = list(eye)
            ops[a] = _diff(sizes[a], 1) / g[a]
            ops[b] = _diff(sizes[b], 1) / g[b]
            terms.append((2.0, along(ops)))
    out = None
    for weight, d in terms:
        q = weight * (d.T @ d) / d.shape[0]  # mean over the difference stencils of the lattice
        out = q if out is None else out + q
    return out.tocsc()


# ------------------------------------------------------------------ fitting
def _factor(lhs: sp.spmatrix):
    """Dense Cholesky factor of the (symmetric positive definite) normal-equation matrix."""
    return cho_factor(lhs.toarray(), lower=True, check_finite=False)


def _solve(lhs: sp.spmatrix, rhs: np.ndarray, factor, start: np.ndarray) -> np.ndarray:
    """Solve lhs @ x = rhs (3 right-hand sides). Later IRLS rounds use conjugate gradients preconditioned with
    the first round's Cholesky factor (the matrix changes only through the robust weights)."""
    if factor is None:
        return start  # the caller factors and solves directly
    precond = LinearOperator(lhs.shape, matvec=lambda v: cho_solve(factor, v, check_finite=False))
    out = np.empty_like(start)
    for c in range(3):
        x, info = cg(lhs, rhs[:, c], x0=start[c], M=precond, rtol=1e-10, maxiter=500)
        if info != 0:  # not converged: fall back to a fresh factorisation
            x = cho_solve(_factor(lhs), rhs[:, c], check_finite=False)
        out[c] = x
    return out


def _tukey(e: np.ndarray, c: float) -> np.ndarray:
    return np.where(e < c, (1.0 - (e / c) ** 2) ** 2, 0.0)


def _neighbour_weights(points: np.ndarray, residuals: np.ndarray, k: int = 8, floor_mm: float = 1.0) -> np.ndarray:
    """Tukey weights of each residual's distance to the median residual of its k nearest neighbours."""
    if len(points) <= 3:
        return np.ones(len(points))
    kk = min(k + 1, len(points))
    _, idx = cKDTree(points).query(points, k=kk)
    nb = residuals[idx[:, 1:]]  # (N, k, 3), self excluded
    dev = np.linalg.norm(residuals - np.median(nb, axis=1), axis=1)
    c = max(4.0 * float(np.median(dev)), floor_mm)
    return _tukey(dev, c)


def fit_smooth_residual(
    fixed_pts: np.ndarray,
    moving_pts: np.ndarray,
    reference: sitk.Image,
    affine: sitk.Transform | None = None,
    weights: np.ndarray | None = None,
    smoothing_mm: float = 12.0,
    grid_spacing_mm: float = 20.0,
    ridge: float = 1e-5,
    robust_iterations: int = 3,
    robust_floor_mm: float = 1.0,
    max_controls: int = 5000,
) -> SmoothFit:
    """Fit the smooth residual ``r(x) ~ moving_i - affine(fixed_i)`` (see the module docstring).

    Args:
        fixed_pts, moving_pts: (N, 3) correspondences, mm, world LPS.
        reference: the fixed image (only its grid is used); points outside it are ignored.
        affine: fixed -> moving transform the residual is taken after (any sitk transform; ``None`` = identity).
        weights: (N,) confidences >= 0 (``None`` = 1).
        smoothing_mm: length scale of the bending penalty (mm); larger = smoother.
        grid_spacing_mm: B-spline control spacing (mm); the lattice is adjusted to span the grid exactly.
        ridge: weight of a pull of the coefficients towards 0 (relative to the misfit term); tiny by default,
            it only keeps the normal equations definite (a larger value shrinks r where data are sparse).
        robust_iterations: IRLS rounds with Tukey weights (0 = plain weighted least squares).
        robust_floor_mm: smallest Tukey cut-off (mm), so that near-perfect data keep their weights.
        max_controls: cap on the number of B-spline controls (the solve is a dense Cholesky of this size);
            a larger lattice is coarsened (``info["grid_spacing_mm"]`` gives the spacing used).

    Raises:
        InputError: malformed inputs or fewer than :data:`MIN_POINTS` usable correspondences.
    """
    f, m, w0 = check_correspondences(fixed_pts, moving_pts, weights)
    if not isinstance(reference, sitk.Image) or reference.GetDimension() != 3:
        raise InputError("reference must be a 3D SimpleITK image (its grid is used)")
    if smoothing_mm < 0 or grid_spacing_mm <= 0:
        raise InputError(f"smoothing_mm must be >= 0 and grid_spacing_mm > 0, got {smoothing_mm}, {grid_spacing_mm}")
    predicted = f.copy() if affine is None else np.array([affine.TransformPoint(p) for p in f.tolist()]).reshape(-1, 3)
    target = m - predicted

    extent = _extent(reference)
    local = _local_mm(reference, f)
    half = 0.5 * np.array(reference.GetSpacing())
    inside = np.all((local >= -half) & (local <= extent + half), axis=1)
    used = inside & (w0 > 0)
    if used.sum() < MIN_POINTS:
        raise InputError(
            f"{int(used.sum())} correspondences with positive weight inside the fixed grid; "
            f"a smooth field needs at least {MIN_POINTS}"
        )
    local_u = np.clip(local[used], 0.0, extent)
    target_u = target[used]
    spacing = float(grid_spacing_mm)
    while True:
        n_ctrl = np.maximum(np.ceil(extent / spacing).astype(np.int64), 1)  # lattice cells per axis
        if np.prod(n_ctrl + 3) <= max_controls:
            break
        spacing *= 1.1
    g = np.where(extent > 0, extent / n_ctrl, spacing)
    k_xyz = n_ctrl + 3  # controls per axis (one cell of support beyond each end)
    b = _design(local_u, g, k_xyz)
    penalty = _bending_penalty(k_xyz, g) * float(smoothing_mm) ** 4 + (ridge / b.shape[1]) * sp.eye(b.shape[1], format="csc")

    rob = _neighbour_weights(f[used], target_u, floor_mm=robust_floor_mm) if robust_iterations > 0 else np.ones(len(target_u))
    coef = np.zeros((3, b.shape[1]))
    factor = None
    for it in range(max(1, robust_iterations + 1)):
        wt = w0[used] * rob
        if wt.sum() <= 0:
            raise InputError("every correspondence was rejected as an outlier; no smooth field can be fitted")
        bw = b.multiply((wt / wt.sum())[:, None]).tocsr()
        lhs = (b.T @ bw).tocsc() + penalty
        rhs = np.asarray(bw.T @ target_u)
        coef = _solve(lhs, rhs, factor, coef)
        if factor is None:
            factor = _factor(lhs)
            coef = np.stack([cho_solve(factor, rhs[:, c]) for c in range(3)])
        fit = b @ coef.T
        err = np.linalg.norm(fit - target_u, axis=1)
        if it < robust_iterations:
            cut = max(4.0 * float(np.median(err)), robust_floor_mm)
            rob = _tukey(err, cut)

    weights_out = np.zeros(len(f))
    weights_out[used] = w0[used] * rob
    residuals = np.full(len(f), np.nan)
    residuals[used] = err
    kx, ky, kz = (int(v) for v in k_xyz)
    return SmoothFit(
        coefficients=coef.reshape(3, kz, ky, kx),
        reference=grid_of(reference),
        control_spacing_mm=g,
        weights=weights_out,
        residuals_mm=residuals,
        used=used,
        info={
            "smoothing_mm": float(smoothing_mm),
            "grid_spacing_mm": [float(v) for v in g],
            "controls": [kx, ky, kz],
            "ridge": float(ridge),
            "n_points": int(len(f)),
            "n_used": int(used.sum()),
            "n_downweighted": int(np.sum(rob < 0.5)),
            "median_residual_mm": float(np.median(err)),
        },
    )


def linear_displacement(transform: sitk.Transform, reference: sitk.Image, slab_voxels: int = 2_000_000) -> np.ndarray:
    """``T(x) - x`` (D, H, W, 3 world mm) of a linear transform on every voxel of ``reference``, computed in slabs."""
    origin = np.array(transform.TransformPoint((0.0, 0.0, 0.0)))
    matrix = np.stack(
        [np.array(transform.TransformPoint(tuple(np.eye(3)[a]))) - origin for a in range(3)], axis=1
    )  # columns: images of the unit vectors
    n = np.array(reference.GetSize())
    step = direction_matrix(reference) * np.array(reference.GetSpacing())[None, :]
    out = np.empty(tuple(n[::-1]) + (3,), dtype=np.float64)
    jj, ii = np.meshgrid(np.arange(n[1]), np.arange(n[0]), indexing="ij")
    plane = np.stack([ii, jj, np.zeros_like(ii)], axis=-1).astype(np.float64) @ step.T + np.array(reference.GetOrigin())
    a_minus_i = matrix - np.eye(3)
    for z in range(n[2]):
        pts = plane + z * step[:, 2]
        out[z] = pts @ a_minus_i.T + origin
    return out


def fit_smooth_field(
    fixed_pts: np.ndarray,
    moving_pts: np.ndarray,
    reference: sitk.Image,
    affine: sitk.Transform | None = None,
    weights: np.ndarray | None = None,
    smoothing_mm: float = 12.0,
    grid_spacing_mm: float = 20.0,
    **options,
) -> sitk.Image:
    """Dense displacement field on ``reference``'s grid: fixed ``x`` -> moving ``affine(x) + r(x)``.

    Args:
        fixed_pts, moving_pts: (N, 3) correspondences (mm, world LPS).
        reference: the fixed image (its grid: size, origin, spacing, direction).
        affine: fixed -> moving transform (e.g. ``fit_affine_ransac(...).transform``); ``None`` = identity.
        weights: (N,) correspondence confidences >= 0.
        smoothing_mm, grid_spacing_mm, options: see :func:`fit_smooth_residual`.

    Returns:
        ``sitkVectorFloat64`` displacement field (mm, world LPS) on the grid of ``reference``.
    """
    fit = fit_smooth_residual(
        fixed_pts, moving_pts, reference, affine, weights, smoothing_mm=smoothing_mm, grid_spacing_mm=grid_spacing_mm, **options
    )
    return field_from_fit(fit, affine)


def field_from_fit(fit: SmoothFit, affine: sitk.Transform | None = None) -> sitk.Image:
    """The displacement field ``affine(x) + r(x) - x`` of a :class:`SmoothFit` on its reference grid."""
    disp = fit.dense()
    if affine is not None:
        if affine.IsLinear():
            disp += linear_displacement(affine, fit.reference)
        else:
            disp += sitk.GetArrayFromImage(transform_to_field(affine, fit.reference))
    out = sitk.GetImageFromArray(disp, isVector=True)
    out.CopyInformation(fit.reference)
    return out
