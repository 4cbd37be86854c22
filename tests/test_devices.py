"""regsam.devices: one device parser for the embedder, the matcher and the registration stages."""

from __future__ import annotations

import pytest
import torch

from regsam.devices import resolve_device
from regsam.errors import InputError


def test_names_and_default():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("name, message", [("gpu0", "unknown device"), ("meta", "must be 'cpu' or 'cuda'")])
def test_bad_names_are_input_errors(name, message):
    with pytest.raises(InputError, match=message):
        resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_an_input_error():
    with pytest.raises(InputError, match="CUDA is not available"):
        resolve_device("cuda")
