"""Reading, writing and normalising 3D images.

Every image in regsam is a :class:`SimpleITK.Image` whose geometry (origin,
spacing, direction) is in millimetres and LPS world coordinates, exactly as
SimpleITK reports it.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
import SimpleITK as sitk

from regsam.errors import InputError
from regsam.io.atomic import atomic_path
from regsam.io.geometry import direction_matrix
from regsam.util import last_line

#: HU value used outside the scanned field of view (air).
AIR_HU = -1024.0
#: SimpleITK pixel types that can hold NaN or infinite values.
FLOAT_PIXEL_IDS = (sitk.sitkFloat32, sitk.sitkFloat64)


def _describe(path: Path) -> str:
    return f"'{path}'"


def check_volume(image: sitk.Image, name: str = "image") -> sitk.Image:
    """Raise :class:`InputError` unless ``image`` is a 3D scalar image without NaNs."""
    if image.GetDimension() != 3:
        raise InputError(f"{name} is {image.GetDimension()}D; a 3D volume is required")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{name} has {image.GetNumberOfComponentsPerPixel()} components per voxel; a scalar image is required"
        )
    if min(image.GetSize()) < 2:
        raise InputError(f"{name} has size {image.GetSize()}; a 3D volume needs at least 2 voxels along each axis")
    if image.GetPixelID() in FLOAT_PIXEL_IDS:
        if not np.isfinite(sitk.GetArrayViewFromImage(image)).all():
            raise InputError(f"{name} contains NaN or infinite values")
    return image


#: Bytes read at a time when checking a NIfTI file's data (a multiple of every voxel size).
_CHUNK_BYTES = 1 << 22


def _is_nifti(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith((".nii", ".nii.gz"))


def _nifti_nonfinite(path: Path, label: str) -> np.ndarray | None:
    """Check a NIfTI file's voxel data as stored: complete, and where it is not finite.

    SimpleITK's NIfTI reader fills a truncated data block (compressed or not) with zeros and
    reads float NaN/inf voxels as 0, both without a word. This reads the stored bytes once, in
    chunks, as nibabel's header describes them (data offset, shape, on-disk type); for a
    ``.nii.gz`` that is one more decompression of the file.

    Returns:
        Flat indices (file order, x fastest: the C order of SimpleITK's (z, y, x) array) of the
        NaN or infinite voxels of a float image (empty if none), or ``None`` when nibabel cannot
        parse the header (SimpleITK's reader then reports the unreadable file).

    Raises:
        InputError: the data block is shorter than the header says (a truncated file) or corrupt.
    """
    import nibabel as nib

    try:
        image: Any = nib.load(str(path))  # reads the header only
        proxy = image.dataobj
        offset = int(proxy.offset)
        shape = tuple(int(s) for s in proxy.shape)
        dtype = np.dtype(image.header.get_data_dtype())
    except Exception:  # noqa: BLE001 - not parseable by nibabel: SimpleITK's reader gives the error line
        return None
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    check_values = dtype.kind == "f"
    bad: list[np.ndarray] = []
    got = 0
    try:
        with nib.openers.ImageOpener(str(path), "rb") as opened:
            stream = cast(IO[bytes], opened)
            if len(stream.read(offset)) == offset:
                while got < expected:
                    chunk = stream.read(min(_CHUNK_BYTES, expected - got))
                    if not chunk:
                        break
                    if check_values:
                        usable = len(chunk) - len(chunk) % dtype.itemsize
                        where = np.flatnonzero(~np.isfinite(np.frombuffer(chunk[:usable], dtype=dtype)))
                        if len(where):
                            bad.append(where + got // dtype.itemsize)
                    got += len(chunk)
    except EOFError:
        pass  # a cut gzip stream: reported below with the byte count
    except Exception as exc:  # noqa: BLE001 - gzip.BadGzipFile, zlib.error: a damaged stream
        raise InputError(f"{label}: corrupt image data in {path} ({type(exc).__name__}: {exc})") from None
    if got < expected:
        raise InputError(
            f"{label}: truncated image file {path}: less voxel data than the {expected} bytes its header "
            f"announces ({'x'.join(map(str, shape))} voxels of {dtype.name})"
        )
    return np.concatenate(bad) if bad else np.zeros(0, dtype=np.int64)


def replace_nonfinite(image: sitk.Image, value: float, index: np.ndarray | None = None) -> sitk.Image:
    """A copy of a scalar ``image`` with its NaN/inf voxels (or those at flat C-order ``index``) set to ``value``."""
    array = sitk.GetArrayFromImage(image)
    if index is None:
        array[~np.isfinite(array)] = value
    else:
        array.reshape(-1)[index] = value
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out


def read_image(path: str | os.PathLike, name: str | None = None, *, nan_value: float | None = None) -> sitk.Image:
    """Read a 3D image from any SimpleITK format or from a DICOM series folder.

    NIfTI files are also checked as stored (:func:`_nifti_nonfinite`): a truncated file, and
    NaN/inf voxels that SimpleITK alone would read as 0, are refused as in any other format.

    Args:
        path: ``.nii``/``.nii.gz``, ``.mha``/``.mhd``, ``.nrrd`` ... or a folder holding one DICOM series.
        name: what to call the image in error messages (defaults to the path).
        nan_value: replace NaN/inf voxels by this value (e.g. -1024 HU) instead of refusing the image.

    Raises:
        InputError: missing/unreadable/truncated file, not a 3D scalar volume, or NaN/inf voxels
            (unless ``nan_value`` is given).
    """
    path = Path(path)
    label = name or _describe(path)
    if not path.exists():
        raise InputError(f"{label}: file not found: {path}")
    if nan_value is not None and not np.isfinite(nan_value):
        raise InputError(f"the NaN replacement value must be a finite number, got {nan_value}")
    nonfinite = _nifti_nonfinite(path, label) if _is_nifti(path) else None
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise InputError(f"{label}: folder holds no DICOM series: {path}")
            files = reader.GetGDCMSeriesFileNames(str(path), series[0])
            reader.SetFileNames(files)
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(path))
    except InputError:
        raise
    except RuntimeError as exc:
        raise InputError(f"{label}: cannot read image {path} ({last_line(exc, 'unknown error', 160)})") from None
    scalar_3d = image.GetDimension() == 3 and image.GetNumberOfComponentsPerPixel() == 1
    if nonfinite is not None and len(nonfinite) and scalar_3d and image.GetNumberOfPixels() > int(nonfinite.max()):
        if nan_value is None:
            raise InputError(
                f"{label} contains NaN or infinite values ({len(nonfinite)} voxels; "
                "'regsam register --nan-value HU' replaces them)"
            )
        image = replace_nonfinite(image, nan_value, nonfinite)
    elif nan_value is not None and nonfinite is None and scalar_3d and image.GetPixelID() in FLOAT_PIXEL_IDS:
        image = replace_nonfinite(image, nan_value)
    return check_volume(image, label)


def read_raw_volume(
    path: str | os.PathLike,
    size: Sequence[int],
    spacing: Sequence[float],
    dtype: str = "<i2",
    origin: Sequence[float] = (0.0, 0.0, 0.0),
) -> sitk.Image:
    """Read a headerless raw volume such as a DIR-Lab ``.img`` file.

    Args:
        size: voxels along (x, y, z); the file holds x fastest.
        spacing: mm along (x, y, z).
        dtype: numpy dtype string; DIR-Lab uses little-endian int16 (``"<i2"``).
        origin: world position of voxel (0, 0, 0). DIR-Lab's landmark convention
            ``mm = (index - 1) * spacing`` means origin 0.

    Raises:
        InputError: missing file, or a file whose byte count does not match ``size``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"raw image not found: {path}")
    expected = int(np.prod(size)) * np.dtype(dtype).itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise InputError(
            f"{path.name}: {actual} bytes, expected {expected} for {tuple(size)} voxels of {np.dtype(dtype).name} "
            "(truncated or wrong case?)"
        )
    data = np.fromfile(path, dtype=dtype).reshape(tuple(reversed(size)))
    image = sitk.GetImageFromArray(data.astype(data.dtype.newbyteorder("=")))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin))
    return image


def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write ``image`` atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), compress)
    return path


#: deflate without string matching: float voxels hardly repeat, so this keeps the size of the default level-6
#: stream (184 MB for a 17 M-voxel float32 field) at a third of its time; any gzip/NIfTI reader reads it
_GZ_STRATEGY = zlib.Z_HUFFMAN_ONLY
#: bytes per independently deflated block (blocks are compressed on two threads: zlib releases the GIL)
_GZ_BLOCK = 1 << 23
#: gzip member header: magic, deflate, no flags, no mtime (reproducible bytes), no extra flags, unknown OS
_GZ_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"


def _deflate_block(block: bytes, last: bool) -> bytes:
    """Raw deflate of one block, byte-aligned by a sync flush so blocks concatenate into one stream (as pigz does)."""
    packer = zlib.compressobj(1, zlib.DEFLATED, -15, 8, _GZ_STRATEGY)
    return packer.compress(block) + packer.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


def _gzip_file(src: Path, dst: Path) -> None:
    """Write ``src`` gzip-compressed to ``dst``: one standard gzip member, blocks deflated two at a time."""
    size = src.stat().st_size
    crc = 0
    with open(src, "rb") as raw, open(dst, "wb") as out, ThreadPoolExecutor(max_workers=2) as pool:
        out.write(_GZ_HEADER)
        pending: list[Future[bytes]] = []
        done = 0
        while True:  # at least one block, the last one flagged final (an empty file is an empty final block)
            block = raw.read(_GZ_BLOCK)
            done += len(block)
            crc = zlib.crc32(block, crc)
            pending.append(pool.submit(_deflate_block, block, done >= size))
            if len(pending) > 2:  # bounded read-ahead keeps memory at a few blocks
                out.write(pending.pop(0).result())
            if done >= size:
                break
        for job in pending:
            out.write(job.result())
        out.write(struct.pack("<II", crc & 0xFFFFFFFF, size & 0xFFFFFFFF))


def write_nifti_gz(image: sitk.Image, path: str | os.PathLike) -> Path:
    """Write ``image`` as ``.nii.gz`` (SimpleITK's NIfTI bytes, gzip-compressed with entropy coding only).

    The uncompressed ``.nii`` goes to a temporary file beside ``path`` first; ``path`` appears only when complete.
    """
    path = Path(path)
    if not path.name.endswith(".nii.gz"):
        raise InputError(f"{path}: write_nifti_gz writes .nii.gz files only")
    with atomic_path(path) as tmp:
        raw = tmp.with_name(tmp.name[: -len(".gz")])  # unique like tmp, and removed by the same stale-file rule
        try:
            sitk.WriteImage(image, str(raw), False)
            _gzip_file(raw, tmp)
        finally:
            raw.unlink(missing_ok=True)
    return path


def to_lps(image: sitk.Image) -> sitk.Image:
    """Permute and flip axes so the image's direction is as close to identity (LPS) as possible.

    Voxel data is reordered, the physical position of every voxel is unchanged.
    """
    return sitk.DICOMOrient(image, "LPS")


def resample_to_spacing(
    image: sitk.Image,
    spacing: float | Sequence[float],
    interpolator: int = sitk.sitkLinear,
    default_value: float | None = None,
) -> sitk.Image:
    """Resample ``image`` onto a grid with the given spacing (mm) covering the same extent.

    ``default_value`` fills voxels outside the old field of view: by default air
    (-1024 HU) for signed and float images, 0 for unsigned ones (masks, labels).
    """
    if default_value is None:
        unsigned = image.GetPixelID() in (sitk.sitkUInt8, sitk.sitkUInt16, sitk.sitkUInt32, sitk.sitkUInt64)
        default_value = 0.0 if unsigned else AIR_HU
    values = np.asarray(spacing, dtype=np.float64).ravel()  # a number, a sequence or an array
    spacing = (float(values[0]),) * 3 if values.size == 1 else tuple(float(s) for s in values)
    old_spacing = np.array(image.GetSpacing())
    old_size = np.array(image.GetSize())
    new_size = np.maximum(1, np.round(old_size * old_spacing / np.array(spacing))).astype(int)
    # Keep the centre of the field of view fixed so both grids cover the same region.
    direction = direction_matrix(image)
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint(((old_size - 1) / 2.0).tolist()))
    origin = centre - direction @ ((new_size - 1) / 2.0 * np.array(spacing))
    return sitk.Resample(
        image,
        [int(s) for s in new_size],
        sitk.Transform(),
        interpolator,
        origin.tolist(),
        spacing,
        image.GetDirection(),
        default_value,
        image.GetPixelID(),
    )


def standardize(
    image: sitk.Image,
    spacing: float | Sequence[float] | None = None,
    interpolator: int = sitk.sitkLinear,
    pixel_type: int | None = sitk.sitkFloat32,
) -> sitk.Image:
    """Reorient to LPS, optionally resample to ``spacing`` mm and cast; the one entry point downstream code uses."""
    out = to_lps(image)
    if pixel_type is not None and out.GetPixelID() != pixel_type:
        out = sitk.Cast(out, pixel_type)
    if spacing is not None:
        out = resample_to_spacing(out, spacing, interpolator)
    return out


def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    """True if ``a`` and ``b`` share size, origin, spacing and direction."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol)
    )
