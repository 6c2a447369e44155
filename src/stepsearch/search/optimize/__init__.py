"""``stepsearch optimize``: the best sampler for one model at each step budget, in one run.

:func:`optimize` runs, on ONE sample source and ONE tensor cache:

1. **Searches**: every requested family registered in
   :data:`~stepsearch.search.family.FAMILIES` (DP (GITS / OSS), Align Your Steps and OLSS, then
   the ``expensive`` AutoDiffusion with whatever part of ``budget_minutes`` is left, its trial
   budget sized from the measured time of one trial), each through the one job runner
   (:func:`~stepsearch.search.family.run_search`) in ``out/nfe-N/<family>-<solver>/`` (so the
   study stores and the direct families' checkpoints resume inside). Every search optimises
   trajectory error (:class:`~stepsearch.eval.objective.Objective` ``"traj"``)
   on the *search* seed 0.
2. **Baselines**: diffusers' built-in schedulers with their own spacings
   (:func:`~stepsearch.eval.experiment.default_methods`, run in diffusers' own loop from the same
   per-sample noise) and stepsearch solvers x built-in spacings.
3. **Selection and report on other noise** (the judges): ``Objective(source, "fd",
   search_seed=1, held_out_seed=2)`` and the same split for trajectory error. Every candidate -
   search results and baselines alike - is scored on seed 1, the winner per NFE is the lowest
   FD-digits there (trajectory error where the model has no feature network), and the report shows
   seed 2 for every method: noise neither the searches nor the selection saw. Since the baselines
   are candidates too, the winner is never worse than the best baseline on the selection seed.
   Where FD prefers a sampler that is less accurate (higher trajectory error) than another, the
   report says so (the "two judges" rule: FD-digits rewards samplers that miss the model's own
   distribution in the direction of the data).

Text-to-image pipelines (``pipeline=`` a local Stable Diffusion 1.x / 2.x or SDXL directory,
``prompts=``, ``guidance_scale=``): the searches run on a
:class:`~stepsearch.models.pipeline.PipelineModel` (the UNet conditioned on sample ``i``'s
prompt ``i mod len(prompts)``, classifier-free guided, in latent space; samples are VAE-decoded
images), the diffusers baselines run in the pipeline's own loop from the same latent noise and
prompts, and both judges are trajectory error of the decoded images (there is no feature network
for FD). Align Your Steps needs (prompt, image) pairs for its KL upper bound (``ays_data=``, a
folder in the ``imagefolder`` layout, encoded by the pipeline's VAE, each latent conditioned on
its own caption); without them it is skipped and the report says so. The run's fingerprint and the
schedule files name the guidance scale, the image size and a digest of the prompts besides the
weights' digest.

Files (``out/``): ``run.json`` (the run's settings and state), ``nfe-N/scheduler/`` (the winner as
a ``from_pretrained``-able diffusers scheduler; OLSS winners are a
:class:`~stepsearch.integrations.olss.StepsearchOLSSScheduler`), ``nfe-N/best_schedule.json``
(the winner's :class:`~stepsearch.schedule_file.ScheduleFile` with provenance; diffusers
baselines have none), ``nfe-N/winner.json``, ``nfe-N/samples.safetensors`` (the report's sample
grid, made by the written scheduler directories in diffusers' loop), and ``report.{md,json,png}``.

Resuming: every stage writes its result as atomic JSON (``stage.json``, ``judged.json``); a rerun
of the same run skips finished stages. A folder holding another run's results is refused unless
``resume=True`` (keep the stages whose settings still match) or ``overwrite=True``. When the
budget ends before every stage ran, the report is still written from what finished and marked
``partial``.

Modules: :mod:`.settings` (settings, constants), :mod:`.models` (the model of a run),
:mod:`.candidates` (what the judges score), :mod:`.stages` (one family / solver / NFE),
:mod:`.judging` (the judges, the winner's files), :mod:`.report` (``report.{md,png}``),
:mod:`.run` (:func:`optimize`). There are no family-name branches here: family-specific behaviour
is the families' (:class:`~stepsearch.search.family.SearchFamily`).
"""

from stepsearch.search.families.ays import AYS_NEEDS_DATA
from stepsearch.search.optimize.candidates import Candidate, load_scheduler_dir
from stepsearch.search.optimize.report import gains_in_words
from stepsearch.search.optimize.run import optimize
from stepsearch.search.optimize.settings import (
    DEMO_BUDGET_EVALS,
    METHODS,
    REPORT_SEED,
    RUN_FORMAT,
    SELECT_SEED,
    OptimizeResult,
    OptimizeSettings,
    demo_settings,
    pipeline_settings,
)

__all__ = [
    "AYS_NEEDS_DATA",
    "DEMO_BUDGET_EVALS",
    "METHODS",
    "REPORT_SEED",
    "RUN_FORMAT",
    "SELECT_SEED",
    "Candidate",
    "OptimizeResult",
    "OptimizeSettings",
    "demo_settings",
    "gains_in_words",
    "load_scheduler_dir",
    "optimize",
    "pipeline_settings",
]
