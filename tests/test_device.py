from __future__ import annotations

import pytest
import torch

from lm import auto_device, resolve_device

HAS_MPS = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def test_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_auto_is_the_best_available_device():
    assert resolve_device("auto") == resolve_device(None) == auto_device()
    if torch.cuda.is_available():
        assert auto_device().type == "cuda"
    elif HAS_MPS:
        assert auto_device().type == "mps"
    else:
        assert auto_device() == torch.device("cpu")


@pytest.mark.parametrize("name", ["gpu", "cuda:x", ""])
def test_bad_name(name):
    with pytest.raises(ValueError, match="not a device name"):
        resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_when_unavailable(name):
    with pytest.raises(ValueError, match="CUDA is not available") as err:
        resolve_device(name)
    assert "cpu" in str(err.value)


@pytest.mark.skipif(HAS_MPS, reason="needs a machine without MPS")
def test_mps_when_unavailable():
    with pytest.raises(ValueError, match="MPS is not available"):
        resolve_device("mps")
