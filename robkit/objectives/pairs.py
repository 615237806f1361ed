"""Which student crop predicts which teacher crop in distillation, and the crop-major layout checks.

Shared by the RoB losses (:mod:`robkit.objectives.rob`) and feature distillation
(:mod:`robkit.objectives.feature`). Tensors are crop-major: row ``r`` is crop ``r // B`` of image ``r % B``.
"""

from __future__ import annotations

Pair = tuple[int, int]


def pair_mask(n_teacher: int, n_student: int, cross_view: bool = False) -> list[Pair]:
    """The ``(teacher crop t, student crop s)`` pairs that form a loss term, teacher-major order.

    Identical view (RoB, VISSL ``swapped_assignment: false``): ``s == t`` or ``s >= n_teacher``,
    i.e. student global ``i`` is paired with teacher ``i`` only and every other student crop with
    every teacher crop.  Cross view (original DINO/SwAV, Table 5 ablation,
    ``swapped_assignment: true``): every ``s != t``.  With ``n_teacher == 1`` (the checked-in
    RoB-SwAV recipe) identical view pairs *every* student crop with teacher crop 0, cross view all
    but student crop 0 -- the same rule, as in VISSL's SwAV distillation loss.
    """
    if n_teacher < 1 or n_student < n_teacher:
        raise ValueError(
            f"pair_mask needs 1 <= n_teacher <= n_student, got n_teacher={n_teacher}, "
            f"n_student={n_student}; the teacher sees a subset of the student's global crops"
        )
    if cross_view:
        return [(t, s) for t in range(n_teacher) for s in range(n_student) if s != t]
    return [(t, s) for t in range(n_teacher) for s in range(n_student) if s == t or s >= n_teacher]


def _crop_layout(
    student_rows: int, teacher_rows: int, n_teacher: int, n_student: int | None, what: str
) -> tuple[int, int]:
    """``(B, S)`` from the row counts of crop-major tensors, with errors a caller can act on."""
    if n_teacher < 1 or teacher_rows % n_teacher:
        raise ValueError(
            f"{what}: teacher tensor has {teacher_rows} rows, not a multiple of n_teacher_crops="
            f"{n_teacher}; pass the teacher's global crops only, crop-major [T*B, ...]"
        )
    batch = teacher_rows // n_teacher
    if batch == 0 or student_rows % batch:
        raise ValueError(
            f"{what}: student tensor has {student_rows} rows, not a multiple of the batch size "
            f"{batch} implied by the teacher ({teacher_rows} rows / {n_teacher} crops)"
        )
    n_crops = student_rows // batch
    if n_crops < n_teacher or (n_student is not None and n_crops != n_student):
        expected = n_student if n_student is not None else f">= {n_teacher}"
        raise ValueError(
            f"{what}: found {n_crops} student crops of {batch} images, expected {expected}; "
            f"check n_teacher_crops={n_teacher} and the crop-major layout [S*B, ...]"
        )
    return batch, n_crops


__all__ = ["Pair", "_crop_layout", "pair_mask"]
