"""One-thread sections: results that do not depend on the machine's thread count.

A BLAS / LAPACK reduction split across threads sums its terms in an order that depends on the
thread count, so the same least-squares fit on 1 and on 16 threads differs in its last bits, and
a search that branches on such numbers can end elsewhere. Small dense linear algebra whose result
a search keeps (OLSS' fits) runs inside :func:`one_thread`; model calls stay multi-threaded.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["one_thread"]


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the block on one intra-op thread (torch's, hence its BLAS'), then restore the count."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
