"""Thin adapters at the edge (import the submodule you need; each pulls in its own framework).

- :mod:`stepsearch.integrations.diffusers`: drop-in ``SchedulerMixin`` / ``ConfigMixin`` classes
  (:class:`~stepsearch.integrations.diffusers.StepsearchScheduler` and one subclass per solver).
- :mod:`stepsearch.integrations.kdiffusion`: k-diffusion denoisers as stepsearch denoisers,
  k-diffusion-style samplers for every solver, sigma export for k-diffusion and ComfyUI.
"""

__all__ = ["diffusers", "kdiffusion"]
