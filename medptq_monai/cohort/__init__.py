"""Cohort inference: segment thousands of volumes with a quantized bundle, resumable, on local processes or Ray.

``run_cohort`` (``medptq infer``) is the entry point. Ray is imported only for ``ray_address``.
"""

from __future__ import annotations

from .errors import ClusterError, OptionError, OutputDirError, WorkerStartError
from .manifest import MANIFEST_NAME, Manifest, read_rows
from .run import run_cohort
from .sources import Case, discover_cases

__all__ = ["Case", "ClusterError", "MANIFEST_NAME", "Manifest", "OptionError", "OutputDirError", "WorkerStartError",
           "discover_cases", "read_rows", "run_cohort"]
