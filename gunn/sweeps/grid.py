"""The sweep's grid search: Ray Tune's, with a limit on trials at once that a resumed sweep may change.

Tune pickles its search algorithm with the experiment and restores it, limit included, on resume; it
takes no new TuneConfig then. ``GunnGrid`` keeps the limit it has when Tune restores its state, and the
driver sets that limit on the restored one (``with_limit``). Imported only where Ray is installed.
"""

from __future__ import annotations

from typing import Any

from ray.tune.search.basic_variant import BasicVariantGenerator


class GunnGrid(BasicVariantGenerator):
    """A grid search with at most ``max_concurrent`` trials at once (0: as resources allow)."""

    def set_state(self, state: dict[str, Any]) -> None:
        limit = self.max_concurrent
        super().set_state(state)
        self.max_concurrent = limit  # restoring: the limit set now holds


def with_limit(tuner: Any, max_concurrent: int) -> bool:
    """Sets a restored Tuner's limit of trials at once; False when it has no GunnGrid (a sweep started by an
    older gunn) or this Ray Tune keeps its configuration elsewhere (Tuner internals; the resume test
    checks that the limit takes)."""
    config = getattr(getattr(tuner, "_local_tuner", None), "_tune_config", None)
    grid = getattr(config, "search_alg", None)
    if not isinstance(grid, GunnGrid):
        return False
    grid.max_concurrent = max_concurrent
    return True
