"""The annotation loop: :class:`AnnotationSession` (no GUI imports; napari, notebooks and the CLI share it)."""

from spadkit.active.finetune import FinetuneJob, FinetuneResult
from spadkit.active.history import annotated_mask, region_mask
from spadkit.active.session import AnnotationSession, Round, SessionPrediction, dice
from spadkit.active.suggest import Suggestion, rank_slices

__all__ = ["AnnotationSession", "FinetuneJob", "FinetuneResult", "Round", "SessionPrediction", "Suggestion", "annotated_mask", "dice", "rank_slices", "region_mask"]
