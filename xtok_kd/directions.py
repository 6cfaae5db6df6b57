"""The two directions between a teacher and a student vocabulary: their names, and the only place they are
translated into the table's short array prefixes (``t2s_*`` / ``s2t_*``)."""

from __future__ import annotations

from typing import Literal

__all__ = ["DIRECTION_CODES", "Direction", "direction_code"]

#: ``student_to_teacher``: the student's distribution pushed into the teacher vocabulary (the projection default);
#: ``teacher_to_student``: the other way round.
Direction = Literal["student_to_teacher", "teacher_to_student"]

DIRECTION_CODES = {"teacher_to_student": "t2s", "student_to_teacher": "s2t"}


def direction_code(direction: str) -> str:
    """``"t2s"`` or ``"s2t"`` for a direction name; ``ValueError`` naming the value otherwise."""
    code = DIRECTION_CODES.get(direction) if isinstance(direction, str) else None
    if code is None:
        raise ValueError(f"direction must be one of {sorted(DIRECTION_CODES)}, got {direction!r}")
    return code
