"""The annotation loop: :class:`AnnotationSession` (no GUI imports; napari, notebooks and the CLI share it)."""

from spadkit.active.history import region_mask
from spadkit.active.session import AnnotationSession, Round, SessionPrediction, dice
from spadkit.active.suggest import Suggestion, rank_slices

__all__ = ["AnnotationSession", "Round", "SessionPrediction", "Suggestion", "dice", "rank_slices", "region_mask"]
