"""After (or during) a run: loss and lr curves, and the run summary `loracli report` prints.

Nothing here imports torch; matplotlib is imported only when a curve is drawn.
"""

from __future__ import annotations
