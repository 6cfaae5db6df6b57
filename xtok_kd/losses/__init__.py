"""Losses: divergences, vocabulary mappings (projection, ULD, GOLD hybrid), the chunked engine, the nn.Module.

Three tiers, as in Liger-Kernel: per-row math (:mod:`.divergences`, :mod:`.uld`, :mod:`.mappings`), the memory
engine (:mod:`.engine`, a custom autograd Function looping over blocks of aligned rows), and the drop-in
:class:`CrossTokenizerKDLoss`.
"""

from .divergences import (
    DIVERGENCES,
    akl,
    divergence,
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
from .module import CrossTokenizerKDLoss, KDLossOutput, TeacherTopK, max_padding
from .uld import sorted_l1, sorted_l1_topk

__all__ = [
    "CrossTokenizerKDLoss",
    "DIVERGENCES",
    "KDLossOutput",
    "TeacherTopK",
    "akl",
    "divergence",
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
