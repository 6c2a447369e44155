"""Align Your Steps (Sabour, Fidler & Kreis, ICML 2024): schedules that minimise a KL upper bound.

- NVIDIA's published tables are in :mod:`stepsearch.published`;
- :mod:`stepsearch.ays.klub`: the KLUB estimator for any noise schedule and denoiser;
- :mod:`stepsearch.ays.optimize`: the coordinate-wise search with early stopping, hierarchical
  refinement and checkpointing;
- :mod:`stepsearch.ays.search`: the whole job on a sample source (what ``stepsearch search ays``
  runs), writing a schedule file with provenance.
"""
