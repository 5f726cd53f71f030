"""Prefect tasks of the samerge pipeline: one per stage of :data:`samerge.stages.STAGES` (see ``tasks/stages.py``)."""

from tasks.stages import acquire, evaluate, extract, prune, report, score, search, search_trial

__all__ = ["acquire", "extract", "score", "prune", "search", "search_trial", "evaluate", "report"]
