"""Thin adapters at the edge (import the submodule you need; each pulls in its own framework).

- :mod:`stepsearch.integrations.diffusers`: drop-in ``SchedulerMixin`` / ``ConfigMixin`` classes
  (:class:`~stepsearch.integrations.diffusers.StepsearchScheduler` and one subclass per solver).
- :mod:`stepsearch.integrations.plan_scheduler`: a solver plan (S3's per-step rules) as a drop-in
  scheduler (:class:`~stepsearch.integrations.plan_scheduler.StepsearchPlanScheduler`).
- :mod:`stepsearch.integrations.load`: load any scheduler directory a run writes (its class read
  from ``scheduler_config.json``) and the line of Python that does it.
- :mod:`stepsearch.integrations.kdiffusion`: k-diffusion denoisers as stepsearch denoisers,
  k-diffusion-style samplers for every solver, sigma export for k-diffusion and ComfyUI.
"""

__all__ = ["diffusers", "kdiffusion", "load", "plan_scheduler"]
