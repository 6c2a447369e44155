"""The built-in search families, registered in :data:`stepsearch.search.family.FAMILIES` in the
order ``optimize`` runs them (cheap first; ``expensive`` ones are run last with the time left):
DP, Align Your Steps, OLSS, AutoDiffusion, S³. A new family: one module implementing
:class:`~stepsearch.search.family.SearchFamily`, and one :func:`~stepsearch.search.family.register`
line (here, or in the code that uses it)."""

from stepsearch.search.families.autodiffusion import AutoDiffusionFamily
from stepsearch.search.families.ays import AYSFamily
from stepsearch.search.families.dp import DPFamily
from stepsearch.search.families.olss import OLSSFamily
from stepsearch.search.families.s3 import S3Family
from stepsearch.search.family import register

__all__ = ["AYSFamily", "AutoDiffusionFamily", "DPFamily", "OLSSFamily", "S3Family"]

register(DPFamily())
register(AYSFamily())
register(OLSSFamily())
register(AutoDiffusionFamily())
register(S3Family())
