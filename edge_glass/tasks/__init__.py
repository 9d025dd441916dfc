"""Experiment kinds (see base.py): each owns its data, model, loss, evaluation and loaded runs.

    alignment   frozen encoders -> heads -> contrastive Matryoshka loss; retrieval Recall@K
    vlm         frozen (optionally aligned) visual tokens -> projector -> decoder; EM / F1
    nlmm        the nested-learning multimodal model from raw media; retrieval, captions, transcripts
"""
from .base import TASKS, Task, register_task, task_class, task_for
from . import alignment, nlmm, vlm  # noqa: E402,F401  (registration)

__all__ = ["TASKS", "Task", "register_task", "task_class", "task_for"]
