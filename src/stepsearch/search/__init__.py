"""Searches over sampling schedules and the machinery they share.

- :mod:`stepsearch.search.store`: the study store (an Optuna study on SQLite or PostgreSQL) every
  search records its evaluated candidates in; resume and multi-worker runs go through it.
- :mod:`stepsearch.search.job`: output directories, result files and plots of a search job.
- :mod:`stepsearch.search.autodiffusion`: AutoDiffusion's evolutionary search over timestep subsets.
- :mod:`stepsearch.search.dynamic`: GITS / OSS-style dynamic-programming schedules from a grid
  teacher; :mod:`stepsearch.search.published`: GITS' and OptimalSteps' published tables.
"""
