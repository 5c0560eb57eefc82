"""Loading the compiled pieces: the nanobind front module and the backend libraries beside it.

Nothing here needs a GPU. A build without any GPU toolchain still has the front module; a
source checkout that was never built has neither, and the pure-torch fallback still works.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Dict, List, Optional

import torch

try:  # the front module is absent only in a source tree that was never built
    from . import _front  # type: ignore[attr-defined]

    _FRONT_ERROR: Optional[str] = None
except ImportError as exc:  # pragma: no cover - exercised only in unbuilt checkouts
    _front = None  # type: ignore[assignment]
    _FRONT_ERROR = f"front module not built ({exc}); run `pip install .`"

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_BACKEND_FILES = {"cuda": "libarms_cuda.so", "hip": "libarms_hip.so"}
_DL_CODES = {"cuda": 2, "hip": 10}  # DLPack kDLCUDA, kDLROCM
_lock = threading.Lock()
_load_errors: Dict[str, str] = {}

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MODE_LOCAL, MODE_STATS_OUT, MODE_STATS_IN = 0, 1, 2  # ArmsMode (backend_api.h)
_kernels_ready = False


def device_backend_name() -> str:
    """The backend that serves torch's 'cuda' device in this torch build: 'hip' or 'cuda'."""
    return "hip" if getattr(torch.version, "hip", None) else "cuda"


def dl_device_type() -> int:
    """DLPack device type of torch 'cuda' tensors in this torch build (kDLROCM on ROCm)."""
    return _DL_DEVICE_TYPE


_DL_DEVICE_TYPE = _DL_CODES[device_backend_name()]


def kernels_ready() -> bool:
    """gpu_kernels_available(), remembered once true (the per-call hot path asks this)."""
    global _kernels_ready
    if not _kernels_ready:
        _kernels_ready = gpu_kernels_available()
    return _kernels_ready


def load(name: str) -> Optional[str]:
    """Load backend `name` ('cuda' or 'hip') once; return None when loaded, else why not."""
    if _front is None:
        return _FRONT_ERROR
    with _lock:
        if name in _load_errors:
            return _load_errors[name] or None
        path = os.path.join(_PACKAGE_DIR, _BACKEND_FILES[name])
        if not os.path.exists(path):
            error = _missing_library_reason(name)
        else:
            error = _front.load_backend(_DL_CODES[name], path)
        _load_errors[name] = error
        return error or None


def front() -> Any:
    """The front module; raises RuntimeError when the package was never built."""
    if _front is None:
        raise RuntimeError(f"allreduce_rms: {_FRONT_ERROR}")
    return _front


def gpu_kernels_available() -> bool:
    """True when torch sees a GPU and the matching backend library loads."""
    return torch.cuda.is_available() and load(device_backend_name()) is None


# Why a loaded backend may count no device, beyond the runtime's own words.
_NO_DEVICE_HINTS = {
    "cuda": "no NVIDIA driver, or CUDA_VISIBLE_DEVICES hides every GPU",
    "hip": "no AMD GPU driver (amdgpu/ROCm), or HIP_VISIBLE_DEVICES / ROCR_VISIBLE_DEVICES hides every GPU",
}


def build_note(name: str) -> str:
    """What the build did with backend `name`, in words: "built with ..." or "not built: <cause>"
    (the build option that turned it off, or the toolchain that was missing)."""
    notes = getattr(_front, "BUILD_NOTES", None) if _front is not None else None
    if not notes:
        return _FRONT_ERROR or "unknown (a front module without build notes)"
    return str(notes.get(name, "unknown"))


def _missing_library_reason(name: str) -> str:
    note = build_note(name)
    if note.startswith("built"):  # the build made it, but it is not beside the front module
        return f"{_BACKEND_FILES[name]} is missing from the installed package (the build reported: {note})"
    return f"{_BACKEND_FILES[name]} {note}"


def backends() -> List[Dict[str, Any]]:
    """Report every backend: whether it was built, whether it loads, how many devices it sees,
    and, whenever it cannot serve a GPU, why.

    Returns:
        One dict per backend ("cuda", then "hip") with keys

        * ``name``: "cuda" or "hip";
        * ``built`` (bool): its library is in the package; ``build``: what the build did, in
          words (e.g. "not built: configured with ALLREDUCE_RMS_CUDA=OFF", "not built: no CUDA
          toolchain (nvcc) found at build time ...", "built with nvcc 13.0 for architectures ...");
        * ``loaded`` (bool), ``error``: why it did not load ("" when loaded);
        * ``devices`` (int): GPUs the backend's runtime sees;
        * ``reason``: "" when the backend is loaded and sees at least one device, else why not
          (the build cause, the load error, or "loaded, but 0 devices: ..." with the runtime's
          words and the usual causes);
        * ``warp_size`` (int), only when loaded.

    Never raises; needs no GPU. Loading a built backend is attempted (once per process).
    """
    report = []
    for name, filename in _BACKEND_FILES.items():
        built = os.path.exists(os.path.join(_PACKAGE_DIR, filename))
        entry: Dict[str, Any] = {"name": name, "built": built, "build": build_note(name), "loaded": False,
                                 "devices": 0, "error": "", "reason": ""}
        error = load(name)
        if error is None:
            status = _front.backend_status(_DL_CODES[name])
            devices = int(status.get("devices", 0))
            entry.update(loaded=True, devices=devices, warp_size=status.get("warp_size"))
            if devices == 0:
                said = str(status.get("device_error", "") or "")
                entry["reason"] = f"loaded, but 0 devices: {said + '; ' if said else ''}{_NO_DEVICE_HINTS[name]}"
        else:
            entry["error"] = entry["reason"] = error
        report.append(entry)
    return report


def backend_resources() -> Dict[str, Any]:
    """What the GPU backend of this torch build (CUDA, or HIP on ROCm) holds, process-wide.

    Returns a dict with ``workspaces_live`` (native workspaces not yet closed),
    ``ipc_mappings_open`` (peer buffers mapped through CUDA/HIP IPC and not yet closed),
    ``device_bytes`` (Lamport buffers and control blocks of the live workspaces) and ``loaded``.
    Compare two snapshots to check that closing workspaces gave everything back.

    This never loads the backend: one that is not loaded in this process (never used, not
    built, failed to load, or no front module) cannot have allocated anything, so its counts
    are 0 and ``loaded`` is False. No GPU is needed and the device is not synchronized.
    """
    name = device_backend_name()
    with _lock:
        loaded = _front is not None and _load_errors.get(name) == ""
    if not loaded:
        return {"workspaces_live": 0, "ipc_mappings_open": 0, "device_bytes": 0, "loaded": False}
    return {**_front.backend_resources(_DL_CODES[name]), "loaded": True}


def current_stream(device: torch.device) -> int:
    """The raw current stream handle of `device` (cheap: no Python stream object is built)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return raw(device.index if device.index is not None else torch.cuda.current_device())
    return torch.cuda.current_stream(device).cuda_stream
