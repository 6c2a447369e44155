"""Searches over sampling schedules and the machinery they share.

- :mod:`stepsearch.search.family`: the :class:`~stepsearch.search.family.SearchFamily` protocol, the
  registry :data:`~stepsearch.search.family.FAMILIES` and the one job runner
  (:func:`~stepsearch.search.family.run_search`: study store, starting points, held-out scores,
  provenance, result files); docs/search-families.md.
- :mod:`stepsearch.search.families`: the registered adapters (DP, Align Your Steps, OLSS,
  AutoDiffusion).
- :mod:`stepsearch.search.store`: the study store (an Optuna study on SQLite or PostgreSQL) every
  search records its evaluated candidates in; resume and multi-worker runs go through it.
- :mod:`stepsearch.search.job`: output folders, starting spacings, progress, result files, plots.
- :mod:`stepsearch.search.autodiffusion`: AutoDiffusion's evolutionary search over timestep subsets.
- :mod:`stepsearch.search.dynamic`: GITS / OSS-style dynamic-programming schedules from a grid
  teacher (published tables: :mod:`stepsearch.published`).
- :mod:`stepsearch.search.optimize`: ``stepsearch optimize`` over the registered families.
"""
