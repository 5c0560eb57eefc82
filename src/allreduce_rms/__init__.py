"""allreduce_rms: fused tensor-parallel all-reduce + RMSNorm / QK-norm for CUDA and ROCm.

Quick start (one process per GPU, torch.distributed initialized)::

    import allreduce_rms
    ws = allreduce_rms.Workspace(group)            # collective; picks fused or fallback path
    q, k = allreduce_rms.qk_norm(qkv, q_w, k_w, q_size, kv_size, eps=1e-6, workspace=ws)
"""

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _distribution_version

from ._native import backends
from .workspace import Workspace, WorkspaceError, workspace_for
from . import custom_ops  # registers torch.ops.allreduce_rms.*
from .custom_ops import qk_norm, qk_norm_separate, rms_norm  # ops.* when eager, the custom ops when traced
from .modules import TPQKNorm, TPRMSNorm

__all__ = ["TPQKNorm", "TPRMSNorm", "Workspace", "WorkspaceError", "backends", "custom_ops", "qk_norm",
           "qk_norm_separate", "rms_norm", "workspace_for"]
try:  # the version is written once, in pyproject.toml
    __version__ = _distribution_version("allreduce-rms")
except _PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
    __version__ = "0+unknown"
