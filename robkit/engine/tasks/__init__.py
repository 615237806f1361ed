"""Training tasks, one module per method on the shared base (:mod:`robkit.engine.tasks.base`)."""

from robkit.engine.tasks.base import (
    Online,
    Task,
    ema_update_,
    momentum_copy,
    momentum_pairs,
    size_groups,
)
from robkit.engine.tasks.dino import DINOTask
from robkit.engine.tasks.features import FeatureDistillTask
from robkit.engine.tasks.mocov2 import MoCoTask
from robkit.engine.tasks.rob import RoBTask, rob_student_head, teacher_input
from robkit.engine.tasks.swav import SwAVTask

__all__ = [
    "DINOTask",
    "FeatureDistillTask",
    "MoCoTask",
    "Online",
    "RoBTask",
    "SwAVTask",
    "Task",
    "ema_update_",
    "momentum_copy",
    "momentum_pairs",
    "rob_student_head",
    "size_groups",
    "teacher_input",
]
