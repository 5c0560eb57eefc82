"""backends() on CPU: every backend that cannot serve a GPU says why, naming the build option or
the missing toolchain when that is the cause. The build's own notes are checked against this
build; the other cases run on a fake front module with the facts monkeypatched.
"""

from __future__ import annotations

import os
from typing import Any, Dict

import pytest
import torch

import allreduce_rms
from allreduce_rms import _native


def test_this_build_names_what_it_did_with_each_backend():
    for entry in allreduce_rms.backends():
        name, option = entry["name"], f"ALLREDUCE_RMS_{entry['name'].upper()}"
        assert entry["build"].startswith(("built with", "not built: ")), entry
        if entry["build"].startswith("not built"):
            assert not entry["built"]
            assert option in entry["build"], entry  # "configured with ...=OFF" or "(...=AUTO)"
            assert entry["reason"] and entry["build"] in entry["reason"], entry
        if entry["loaded"] and entry["devices"] == 0:
            assert entry["reason"].startswith("loaded, but 0 devices: "), entry
        if not entry["loaded"]:
            assert entry["reason"] == entry["error"] != "", entry
        if entry["loaded"] and entry["devices"] > 0:
            assert entry["reason"] == "", entry
        assert name in ("cuda", "hip")


def test_a_built_cuda_backend_without_a_gpu_says_so():
    entry = next(e for e in allreduce_rms.backends() if e["name"] == "cuda")
    if not entry["built"]:
        pytest.skip(f"the CUDA backend is not built here: {entry['build']}")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    # a CUDA backend with static cudart loads without a driver, then counts no device
    assert entry["loaded"] and entry["devices"] == 0, entry
    assert entry["reason"].startswith("loaded, but 0 devices: ")
    assert "CUDA_VISIBLE_DEVICES" in entry["reason"] and "driver" in entry["reason"], entry


class _FakeFront:
    """The front module's backend entry points, answering from the given facts."""

    def __init__(self, notes: Dict[str, str], devices: Dict[str, int], device_error: str = "",
                 load_error: str = "") -> None:
        self.BUILD_NOTES = notes
        self._devices, self._device_error, self._load_error = devices, device_error, load_error

    def load_backend(self, code: int, path: str) -> str:
        return self._load_error

    def backend_status(self, code: int) -> Dict[str, Any]:
        name = {2: "cuda", 10: "hip"}[code]
        count = self._devices[name]
        return {"loaded": True, "error": "", "devices": count, "warp_size": 32 if name == "cuda" else 64,
                "device_error": "" if count else self._device_error}


def _fake(monkeypatch: pytest.MonkeyPatch, front: _FakeFront, present: Dict[str, bool]) -> Dict[str, Dict[str, Any]]:
    monkeypatch.setattr(_native, "_front", front)
    monkeypatch.setattr(_native, "_FRONT_ERROR", None)
    monkeypatch.setattr(_native, "_load_errors", {})
    real_exists = os.path.exists
    files = {os.path.join(_native._PACKAGE_DIR, f): present[n] for n, f in _native._BACKEND_FILES.items()}
    monkeypatch.setattr(os.path, "exists", lambda p: files[p] if p in files else real_exists(p))
    return {e["name"]: e for e in _native.backends()}


def test_reasons_name_the_build_option_or_the_missing_toolchain(monkeypatch):
    notes = {"cuda": "not built: configured with ALLREDUCE_RMS_CUDA=OFF",
             "hip": "not built: no HIP toolchain (ROCm hipcc/clang) found at build time (ALLREDUCE_RMS_HIP=AUTO)"}
    got = _fake(monkeypatch, _FakeFront(notes, {"cuda": 1, "hip": 1}), {"cuda": False, "hip": False})
    assert got["cuda"]["reason"] == "libarms_cuda.so not built: configured with ALLREDUCE_RMS_CUDA=OFF"
    assert "no HIP toolchain" in got["hip"]["reason"] and "ALLREDUCE_RMS_HIP=AUTO" in got["hip"]["reason"]
    assert "toolchain" not in got["cuda"]["reason"], "an OFF option must not be blamed on a missing toolchain"
    for entry in got.values():
        assert (entry["built"], entry["loaded"], entry["devices"]) == (False, False, 0)


def test_a_built_library_missing_from_the_package(monkeypatch):
    notes = {"cuda": "built with nvcc 13.0 for architectures 80,90a", "hip": "not built: configured with "
             "ALLREDUCE_RMS_HIP=OFF"}
    got = _fake(monkeypatch, _FakeFront(notes, {"cuda": 1, "hip": 0}), {"cuda": False, "hip": False})
    assert "missing from the installed package" in got["cuda"]["reason"] and "nvcc 13.0" in got["cuda"]["reason"]


def test_loaded_with_no_device_gives_the_runtime_words_and_the_usual_causes(monkeypatch):
    notes = {"cuda": "built with nvcc 13.0 for architectures 80,90a", "hip": "built with Clang 19 for gfx942"}
    front = _FakeFront(notes, {"cuda": 0, "hip": 0}, device_error="counting devices: no CUDA-capable device is detected")
    got = _fake(monkeypatch, front, {"cuda": True, "hip": True})
    cuda, hip = got["cuda"], got["hip"]
    assert cuda["loaded"] and cuda["devices"] == 0 and cuda["error"] == ""
    assert cuda["reason"] == ("loaded, but 0 devices: counting devices: no CUDA-capable device is detected; "
                              "no NVIDIA driver, or CUDA_VISIBLE_DEVICES hides every GPU")
    assert hip["reason"].startswith("loaded, but 0 devices: ") and "HIP_VISIBLE_DEVICES" in hip["reason"]


def test_loaded_with_devices_has_no_reason(monkeypatch):
    notes = {"cuda": "built with nvcc 13.0 for architectures 80,90a", "hip": "not built: configured with "
             "ALLREDUCE_RMS_HIP=OFF"}
    got = _fake(monkeypatch, _FakeFront(notes, {"cuda": 2, "hip": 0}), {"cuda": True, "hip": False})
    assert got["cuda"]["reason"] == "" and got["cuda"]["devices"] == 2 and got["cuda"]["warp_size"] == 32
    assert got["hip"]["reason"].endswith("configured with ALLREDUCE_RMS_HIP=OFF")


def test_a_load_failure_is_the_reason(monkeypatch):
    notes = {"cuda": "built with nvcc 13.0 for architectures 80,90a", "hip": "built with Clang 19 for gfx942"}
    front = _FakeFront(notes, {"cuda": 1, "hip": 1}, load_error="libamdhip64.so.6: cannot open shared object file")
    got = _fake(monkeypatch, front, {"cuda": True, "hip": True})
    assert got["hip"]["reason"] == got["hip"]["error"] == "libamdhip64.so.6: cannot open shared object file"
    assert not got["hip"]["loaded"]


def test_an_unbuilt_checkout(monkeypatch):
    monkeypatch.setattr(_native, "_front", None)
    monkeypatch.setattr(_native, "_FRONT_ERROR", "front module not built (...); run `pip install .`")
    monkeypatch.setattr(_native, "_load_errors", {})
    for entry in _native.backends():
        assert entry["reason"].startswith("front module not built"), entry
