"""OLSS: the optimal linear-subspace solver (Duan et al. 2023, arXiv 2305.14677), fitted on the
user's own model and shipped as data.

- :mod:`~stepsearch.olss.trajectories`: teacher trajectories (recorded through the one sampling
  loop or a recording drop-in scheduler, cached as safetensors shards) and their QR summary;
- :mod:`~stepsearch.olss.fit`: least-squares coefficients along a path of teacher indices, and the
  path searches (the paper's greedy search, the uniform path, an exact DP);
- :mod:`~stepsearch.solvers.olss`: the fitted rule as JSON data and the solver that runs it;
- :mod:`~stepsearch.olss.search`: the whole job (teacher, fit, scores against baselines, files).
"""

from stepsearch.olss.fit import (
    PATH_SEARCHES,
    OLSSFit,
    dp_path,
    fit_olss,
    greedy_path,
    rollout_fit,
    teacher_forced_fit,
    uniform_path,
)
from stepsearch.olss.trajectories import (
    TeacherRecording,
    TeacherTrajectory,
    TrajectorySummary,
    record_pipeline_teacher,
    record_teacher,
)
from stepsearch.solvers.olss import OLSSCoefficients, OLSSSolver, ddim_coefficients

__all__ = [
    "PATH_SEARCHES",
    "OLSSCoefficients",
    "OLSSFit",
    "OLSSSolver",
    "TeacherRecording",
    "TeacherTrajectory",
    "TrajectorySummary",
    "ddim_coefficients",
    "dp_path",
    "fit_olss",
    "greedy_path",
    "record_pipeline_teacher",
    "record_teacher",
    "rollout_fit",
    "teacher_forced_fit",
    "uniform_path",
]
