"""Split virtqueues, device side: a C fast path and a pure-Python reference, one API.

``SplitQueue`` is the C implementation (``_ring``) when it is built, else the Python one
(``pyring``); ``EDGEVIRT_RING=python`` forces Python. ``IMPLEMENTATIONS`` maps "c" and
"python" to the classes that are available, for tests and benchmarks. ``Chain`` is the type
of what ``SplitQueue.pop`` returns: ``(head, readable, writable)`` with ``(gpa, len)`` lists.
``BlkAio`` is the C path's asynchronous blk engine (None without the C ring).
The driver-side mock queue is :mod:`edgevirt.backend.virtq.driver`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from edgevirt.backend.virtq import pyring
from edgevirt.backend.virtq.pyring import Chain, MemoryTable, Segment

#: Chains a serving call takes before it publishes their used entries and signals. Small, so
#: that the driver takes the first completions and refills while the back-end serves the
#: rest: two CPUs work at once instead of in turn. 4 KiB reads from the page cache at QD32
#: (bench/run.py --page-cache): 219-244 k IOPS with 32-64, 305 k with 16, 439 k with 4,
#: 510-584 k with 8.
#: A driver with EVENT_IDX still gets no more interrupts than it asks for.
SERVE_BATCH = 8

IMPLEMENTATIONS: dict[str, type[pyring.SplitQueue]] = {}
#: The C asynchronous blk request path (io_uring or threads), None when the C ring is absent.
BlkAio: Any = None
try:
    from edgevirt.backend.virtq import _ring
except ImportError:  # not built: the reference serves alone
    pass
else:
    IMPLEMENTATIONS["c"] = _ring.SplitQueue  # type: ignore[assignment]
    BlkAio = _ring.BlkAio
IMPLEMENTATIONS["python"] = pyring.SplitQueue

if TYPE_CHECKING:
    from edgevirt.backend.virtq.pyring import SplitQueue
else:
    _forced_python = os.environ.get("EDGEVIRT_RING") == "python"
    SplitQueue = IMPLEMENTATIONS["c" if "c" in IMPLEMENTATIONS and not _forced_python else "python"]

__all__ = [
    "BlkAio",
    "IMPLEMENTATIONS",
    "SERVE_BATCH",
    "Chain",
    "MemoryTable",
    "Segment",
    "SplitQueue",
]
