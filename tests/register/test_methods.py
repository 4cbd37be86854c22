"""The method registry: one MethodSpec per method; README, CLI, bench and API read it; presets are validated dataclasses."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from regsam.errors import InputError
from regsam.register.methods import METHODS, MethodSpec, get_method, methods_table_markdown, resolve_preset
from regsam.register.presets import (
    CONVEXADAM_PRESETS,
    ELASTIX_DEFAULT_PRESET,
    ELASTIX_PRESETS,
    ConvexAdamPreset,
    ElastixPreset,
    choose_preset,
    preset_settings,
)

README = Path(__file__).resolve().parents[2] / "README.md"


def small_volume() -> sitk.Image:
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.normal(-500.0, 200.0, (12, 14, 16)).astype(np.float32))
    image.SetSpacing((3.0, 3.0, 3.0))
    return image


# ------------------------------------------------------------------ one registry, read everywhere
def test_readme_method_table_is_the_registry():
    text = README.read_text()
    assert text.count(methods_table_markdown()) == 1
    table = [line for line in text.splitlines() if line.startswith("| `")]
    listed = {}
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0].strip("`") in METHODS:
            listed[cells[0].strip("`")] = [p.split("`")[1] for p in cells[1].split(",")]
    assert listed == {name: list(spec.presets) for name, spec in METHODS.items()}


@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_preset_table_matches_its_spec(name):
    spec = METHODS[name]
    table = spec.load_presets()
    assert tuple(table) == spec.presets and spec.default_preset in table
    for preset in table.values():
        assert dataclasses.is_dataclass(preset) and type(preset).__dataclass_params__.frozen
        json.dumps(preset_settings(preset))  # what goes into summary.json
    chosen, preset = resolve_preset(name, None)
    assert chosen == spec.default_preset and preset is table[spec.default_preset]
    with pytest.raises(InputError, match=f"unknown {name.replace('+', '[+]')} preset 'nope'"):
        resolve_preset(name, "nope")


def test_module_defaults_agree_with_the_registry():
    from regsam.register import convexadam, sam, sam_elastix

    assert ELASTIX_DEFAULT_PRESET == METHODS["elastix"].default_preset
    assert convexadam.DEFAULT_PRESET == METHODS["convexadam"].default_preset
    assert sam.DEFAULT_PRESET == METHODS["sam"].default_preset
    assert sam_elastix.DEFAULT_PRESET == METHODS["sam+elastix"].default_preset


def test_cli_and_bench_read_the_registry():
    from regsam.bench.runner import MethodChoice, parse_methods
    from regsam.cli import build_parser

    help_text = build_parser()._subparsers._group_actions[0].choices["register"].format_help()  # noqa: SLF001
    for name, spec in METHODS.items():
        assert name in help_text and all(p in help_text for p in spec.presets)
    assert [c.label for c in parse_methods("elastix:fast,sam", task="register")] == ["elastix:fast", "sam"]
    with pytest.raises(InputError, match="unknown elastix preset 'nope'"):
        parse_methods("elastix:nope", task="register")
    # the match task has presets of its own
    assert parse_methods("sam:cycle", task="match") == [MethodChoice("sam", "cycle")]
    with pytest.raises(InputError, match="unknown method 'demons'"):
        parse_methods("demons")


# ------------------------------------------------------------------ presets: frozen dataclasses validated on construction
def test_presets_validate_on_construction_and_replace():
    lung = CONVEXADAM_PRESETS["lung"]
    assert dataclasses.replace(lung, selected_niter=5).selected_niter == 5
    for bad, message in [
        ({"selected_smooth": 2}, "selected_smooth must be 0 or odd"),
        ({"grid_sp": 0}, "grid_sp must be an integer >= 1"),
        ({"disp_hw": 2.5}, "disp_hw must be an integer"),
        ({"spacing_mm": -1.0}, "spacing_mm must be positive"),
        ({"ic": "yes"}, "ic must be True or False"),
    ]:
        with pytest.raises(InputError, match=message):
            dataclasses.replace(lung, **bad)
    with pytest.raises(dataclasses.FrozenInstanceError):
        lung.grid_sp = 3  # type: ignore[misc]
    with pytest.raises(InputError, match="not found"):
        ElastixPreset(files=("nope.txt",))
    assert all(p.is_file() for preset in ELASTIX_PRESETS.values() for p in preset.paths)
    assert isinstance(CONVEXADAM_PRESETS["fast"], ConvexAdamPreset) and CONVEXADAM_PRESETS["fast"].spacing_mm == 2.5
    with pytest.raises(InputError, match=r"unknown thing preset 'x' \(known: a, b\)"):
        choose_preset({"a": 1, "b": 2}, "x", "a", "thing")


def test_sam_elastix_preset_validates():
    from regsam.register.sam_elastix import SamElastixPreset

    with pytest.raises(InputError, match="unknown elastix preset"):
        SamElastixPreset(elastix="nope", points_weights=(0.5,))
    with pytest.raises(InputError, match="points_weights"):
        SamElastixPreset(elastix="fast", points_weights=(-1.0,))


# ------------------------------------------------------------------ options and masks a method does not take
@pytest.mark.parametrize(
    "method,options,message",
    [
        ("elastix", {"device": "cpu"}, "method 'elastix' does not take the option\\(s\\) device"),
        ("convexadam", {"stages": "affine"}, "method 'convexadam' does not take the option\\(s\\) stages"),
        ("sam", {"overrides": {}}, "method 'sam' does not take the option\\(s\\) overrides"),
        ("sam", {"moving_mask": "MASK"}, "method 'sam' does not use a moving mask \\(it uses a fixed mask\\)"),
    ],
)
def test_options_and_masks_a_method_does_not_take_are_refused_before_it_runs(method, options, message):
    from regsam.register.api import register

    image = small_volume()
    options = {k: (sitk.Cast(image > -500, sitk.sitkUInt8) if v == "MASK" else v) for k, v in options.items()}
    with pytest.raises(InputError, match=message):
        register(image, image, method=method, **options)


def test_spec_checks_its_own_shape_and_unknown_methods_are_listed():
    with pytest.raises(ValueError, match="default preset"):
        MethodSpec(name="x", run=print, presets=("a",), default_preset="b", options=frozenset(),
                   uses_masks=frozenset(), summary="")
    with pytest.raises(InputError, match="unknown registration method 'x' \\(known: sam, sam-net, elastix, sam\\+elastix, convexadam, ants\\)"):
        get_method("x")


def test_importing_the_registry_and_the_cli_stays_cheap():
    """No method module (itk-elastix ~20 s, torch) is imported just to list methods or build the CLI."""
    code = (
        "import sys; import regsam.cli, regsam.register.api, regsam.bench.runner; "
        "heavy = [m for m in ('itk', 'torch', 'regsam.register.elastix', 'regsam.register.sam') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
