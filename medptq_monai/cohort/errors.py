"""Errors of cohort runs that are not about one case: a bad output folder, an unreachable cluster."""

from __future__ import annotations

from ..errors import EngineUnavailableError, MedPTQError


class OutputDirError(MedPTQError, ValueError):
    """The output folder is unusable: inside the input folder, not writable, or locked by another run."""


class ClusterError(EngineUnavailableError):
    """Ray is not installed, the cluster does not answer, or it has too few CPUs for the workers asked for."""


class WorkerStartError(MedPTQError, RuntimeError):
    """A worker could not load the bundle's engine (the run stops before or while cases run)."""


class OptionError(MedPTQError, ValueError):
    """A cohort option is out of range (``--workers 0``, ``--threads -1``, ...)."""
