"""Test-session settings shared by every test module."""

from __future__ import annotations

import os
import tempfile

# Searches cache teachers and reference features on disk (stepsearch.cache). Tests must neither
# read a stale cache from the home directory nor fill it: one fresh directory per session, unless
# the caller (CI) names one.
os.environ.setdefault("STEPSEARCH_CACHE", tempfile.mkdtemp(prefix="stepsearch-test-cache-"))
