"""Dataset manifests: what a public dataset's download must contain, file by file.

A manifest is a JSON file in the package data folder ``regsam/data/manifests/``
(also reachable as ``data_manifests/`` at the repository root). It records the
dataset's name, description, citation, URL, the image and landmark formats
(byte layout, voxel spacing in mm, orientation) and one entry per case with the
distributed file names, exact byte counts and the published initial landmark
error in mm. :mod:`regsam.data.prepare` validates a user's download against it.

Manifests are read with :mod:`importlib.resources`, so they work from a source
checkout, an editable install and an installed wheel alike.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import TYPE_CHECKING

from regsam.errors import InputError

if TYPE_CHECKING:  # importlib.resources.abc is 3.11+; the annotation is only for readers and type checkers
    from importlib.resources.abc import Traversable

#: keys every manifest must have (the rest depends on its ``kind``)
REQUIRED_KEYS = ("name", "description", "citation", "url", "kind", "cases")
#: manifest kinds :mod:`regsam.data.prepare` knows how to prepare
KINDS = ("dirlab_raw", "learn2reg")


def manifest_folder() -> Traversable:
    """The package data folder holding the ``NAME.json`` manifests."""
    return resources.files("regsam.data") / "manifests"


def manifest_names() -> list[str]:
    """Names of the shipped manifests, sorted (``["copdgene", "dirlab4dct", "nlst"]``)."""
    folder = manifest_folder()
    return sorted(item.name[: -len(".json")] for item in folder.iterdir() if item.name.endswith(".json"))


def _check(manifest: object, source: str) -> dict:
    # A broken manifest is a packaging bug, but report it the same one-line way as bad input.
    if not isinstance(manifest, dict):
        raise InputError(f"manifest {source}: top level must be a JSON object")
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise InputError(f"manifest {source}: missing key(s) {', '.join(missing)}")
    if manifest["kind"] not in KINDS:
        raise InputError(f"manifest {source}: unknown kind '{manifest['kind']}' (known: {', '.join(KINDS)})")
    if not isinstance(manifest["cases"], list) or not all(isinstance(c, dict) and "id" in c for c in manifest["cases"]):
        raise InputError(f"manifest {source}: 'cases' must be a list of objects with an 'id'")
    return manifest


def load_manifest(name: str) -> dict:
    """Return the manifest of dataset ``name`` (``dirlab4dct``, ``copdgene`` or ``nlst``) as a dict.

    Raises:
        InputError: no manifest of that name, or the file is not a valid manifest.
    """
    names = manifest_names()
    if name not in names:
        raise InputError(f"unknown dataset '{name}'; known: {', '.join(names)}")
    item = manifest_folder() / f"{name}.json"
    try:
        manifest = json.loads(item.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"manifest {name}.json is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    manifest = _check(manifest, f"{name}.json")
    if manifest["name"] != name:
        raise InputError(f"manifest {name}.json names itself '{manifest['name']}'")
    return manifest


def list_manifests() -> list[dict]:
    """All shipped manifests, sorted by name; each has at least ``name``, ``description`` and ``cases``."""
    return [load_manifest(name) for name in manifest_names()]


def find_case(manifest: dict, case: str | int) -> dict:
    """The case entry of ``manifest`` matching ``case``.

    Accepts the manifest id (``case03``, ``copd3``, ``0003``) or anything ending in the case
    number: ``3``, ``case3``, ``Case3Pack``, ``copd3``, ``NLST_0003``.

    Raises:
        InputError: no such case, naming the known ids.
    """
    text = str(case).strip()
    by_id = {entry["id"].lower(): entry for entry in manifest["cases"]}
    if text.lower() in by_id:
        return by_id[text.lower()]
    number = _trailing_number(text)
    if number is not None:
        for entry in manifest["cases"]:
            if _entry_number(entry) == number:
                return entry
    known = ", ".join(entry["id"] for entry in manifest["cases"][:12])
    more = " ..." if len(manifest["cases"]) > 12 else ""
    raise InputError(f"{manifest['name']}: unknown case '{case}'; known: {known}{more}")


def _entry_number(entry: dict) -> int | None:
    if isinstance(entry.get("number"), int):
        return entry["number"]
    return _trailing_number(entry["id"])


def _trailing_number(text: str) -> int | None:
    # "Case3Pack" -> 3, "NLST_0003" -> 3, "copd10" -> 10: the last run of digits names the case.
    digits = ""
    for char in reversed(text):
        if char.isdigit():
            digits = char + digits
        elif digits:
            break
    return int(digits) if digits else None
