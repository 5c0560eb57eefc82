"""Markers: `gpu` tests skip without a GPU and a loadable backend; `multigpu` without 2+ GPUs."""

from __future__ import annotations

import pytest
import torch


def _gpu_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    from allreduce_rms import _native

    return _native.gpu_kernels_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    gpu = _gpu_ready()
    gpus = torch.cuda.device_count() if gpu else 0
    for item in items:
        if "multigpu" in item.keywords and gpus < 2:
            item.add_marker(pytest.mark.skip(reason=f"needs 2+ GPUs with a loaded backend (found {gpus})"))
        elif "gpu" in item.keywords and not gpu:
            item.add_marker(pytest.mark.skip(reason="needs a GPU and a loadable backend"))
