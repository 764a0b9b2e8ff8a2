"""How the gateway's Python process is tuned for many sessions: the event loop relays every
keystroke, and it shares one interpreter lock (the GIL) with the recorder's worker threads and
with the cyclic garbage collector. Measured with ``bench/concurrent_sessions`` at 1,000 typing
sessions on 2 cores (docs/benchmarks.md, "1,000 sessions: where the echo time went"):

* The switch interval. A thread that gives the GIL up for a system call (every socket write
  of an echo) waits for it again until the thread holding it is asked to yield: 5 ms by
  default, each time. 1 ms bounds that wait for the loop; the cost, more switches between
  busy threads, is a few microseconds each.
* The garbage collector. A full (generation 2) collection walks every container object of
  every session, ~650 per session: 0.3-0.6 s with the loop stopped at 1,000 sessions, and
  by default it came every few tens of seconds while sessions were opened and sealed.
  Objects that live as long as the process (modules, configuration, the gateway's services)
  are frozen out of every collection once started, and a full collection waits for 100
  middle ones instead of 10. Garbage in cycles is then freed later: at the rate of
  1,000 typing sessions, a full collection every few minutes instead of every ~10 s.
"""

from __future__ import annotations

import gc
import sys

SWITCH_INTERVAL = 0.001
GC_THRESHOLDS = (700, 10, 100)


def tune_for_sessions() -> None:
    """Call once the gateway's long-lived objects exist, before it takes sessions."""
    sys.setswitchinterval(SWITCH_INTERVAL)
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
