"""Losses: divergences, vocabulary mappings (one module each), the chunked engine, the nn.Module.

Three tiers, as in Liger-Kernel: per-row math (:mod:`.divergences`, :mod:`.uld`, :mod:`.mappings`), the memory
engine (:mod:`.engine`, a custom autograd Function looping over blocks of aligned rows, one entry point), and the
drop-in :class:`CrossTokenizerKDLoss` (:mod:`.module`), which validates the options (:mod:`.options`) and the inputs
(:mod:`.inputs`) and delegates.
"""

from .divergences import (
    DIVERGENCES,
    akl,
    divergence,
    dkl,
    fkl,
    jsd,
    reduce_rows,
    rkl,
    skl,
    srkl,
    symmetric_kl,
    token_kd_loss,
    tvd,
)
from .inputs import max_padding
from .module import CrossTokenizerKDLoss
from .types import Direction, KDLossOutput, TeacherTopK
from .uld import sorted_l1, sorted_l1_topk

__all__ = [
    "DIVERGENCES",
    "CrossTokenizerKDLoss",
    "Direction",
    "KDLossOutput",
    "TeacherTopK",
    "akl",
    "divergence",
    "dkl",
    "fkl",
    "jsd",
    "max_padding",
    "reduce_rows",
    "rkl",
    "skl",
    "sorted_l1",
    "sorted_l1_topk",
    "srkl",
    "symmetric_kl",
    "token_kd_loss",
    "tvd",
]
