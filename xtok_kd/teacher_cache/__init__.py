"""Teacher top-k cache: run the teacher once, distill from its saved top-k many times.

Format version 2 (version 1 lacked ``next_token_logprobs``; it is refused, with the command that rebuilds it).

A cache is a folder::

    manifest.json              format, version, settings (tokenizer fingerprints, top_k, max_length, loss_on,
                               digests of the examples and of the teacher model), and the finished shards
                               (file, example range [start, stop), tokens, bytes, sha256); ``teacher_text`` when
                               `cache-teacher --add-teacher-text` appended teacher-written rows (their count,
                               the corpus digest and the sampling settings)
    shard-00000.safetensors    E examples holding T teacher tokens in all:
        input_ids (T,) int32          each example's unpadded teacher ids (as the collator makes them), concatenated
        topk_ids (T, k) int32         the teacher's k most likely next tokens at each position
        topk_logprobs (T, k) float32  their log-probabilities (full softmax, temperature 1)
        next_token_logprobs (T,) float32  the log-probability of the example's own next token (0 at its last)
        offsets (E+1,) int64          example e's tokens are rows [offsets[e], offsets[e+1])
        examples (J,) uint8           each example as UTF-8 JSON, concatenated; example_offsets (E+1,) int64
    teacher_tokenizer/         the teacher's tokenizer: distilling from the cache needs no teacher at all

Every shard is written to a temp file and renamed into place, then the manifest is rewritten the same way, so a
killed run leaves finished shards that a rerun with the same settings verifies (size, sha256) and keeps.
"""

from __future__ import annotations

from .format import (
           FORMAT,
           VERSION,
           _sha256,  # noqa: F401  (tests verify shard digests with it)
           cache_dir_problem,
           cache_settings,
           read_manifest,
           settings_mismatch,
)
from .read import TeacherCache
from .topk import collate_teacher_topk, teacher_topk
from .write import write_teacher_cache

__all__ = ["FORMAT", "VERSION", "TeacherCache", "cache_dir_problem", "cache_settings", "collate_teacher_topk",
           "read_manifest", "settings_mismatch", "teacher_topk", "write_teacher_cache"]
