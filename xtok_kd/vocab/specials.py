"""Special tokens matched by ROLE, not by string.

``<|im_start|>`` (Qwen, ChatML) and ``<|start_header_id|>`` (Llama 3) both open a chat turn; ``<|im_end|>`` and
``<|eot_id|>`` both close one; ``<s>`` and ``<|begin_of_text|>`` both begin a document. A string comparison never
pairs them. Roles come from two sources: the tokenizer's configured ``bos``/``eos``/``pad``/``unk`` tokens, and
a table of known spellings for structural markers. A role present on both sides yields one pair.
"""

from __future__ import annotations

import numpy as np

from ..tokenizer import TokenizerView

__all__ = ["ROLES", "partners", "special_pairs", "special_roles"]

# role -> known spellings, across families (ChatML / Qwen, Llama 3, Mistral / Llama 2, GPT-2, Gemma, Phi-3).
_SPELLINGS: dict[str, tuple[str, ...]] = {
    "begin_of_text": ("<|begin_of_text|>", "<s>", "<|startoftext|>", "<bos>"),
    "end_of_text": ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>"),
    "turn_start": ("<|im_start|>", "<|start_header_id|>", "[INST]", "<start_of_turn>", "<|user|>"),
    "turn_end": ("<|im_end|>", "<|eot_id|>", "[/INST]", "<end_of_turn>", "<|end|>"),
    "header_end": ("<|end_header_id|>",),
    "fim_prefix": ("<|fim_prefix|>", "<fim_prefix>"),
    "fim_middle": ("<|fim_middle|>", "<fim_middle>"),
    "fim_suffix": ("<|fim_suffix|>", "<fim_suffix>"),
    "fim_pad": ("<|fim_pad|>", "<fim_pad>"),
    "tool_call_start": ("<tool_call>", "[TOOL_CALLS]"),
    "tool_call_end": ("</tool_call>",),
}

# Structural roles first, so ``<|endoftext|>`` pairs with ``<|endoftext|>`` before an instruct model's configured
# eos (its turn end) does; the configured roles then pair whatever the spellings missed.
ROLES: tuple[str, ...] = tuple(_SPELLINGS) + ("bos", "eos", "pad", "unk")


def special_roles(view: TokenizerView) -> dict[str, int]:
    """Role -> id for the special tokens of one tokenizer (roles in :data:`ROLES` order).

    ``bos``/``eos``/``pad``/``unk`` are the configured ids (``pad`` falls back to nothing when unset); the other
    roles are looked up by spelling among the tokenizer's added tokens.
    """
    hf = view.hf
    roles: dict[str, int] = {}
    for role in ("bos", "eos", "pad", "unk"):
        tid = getattr(hf, f"{role}_token_id", None)
        if tid is not None:
            roles[role] = int(tid)
    by_text = {tok.content: int(i) for i, tok in hf.added_tokens_decoder.items()}
    for role, spellings in _SPELLINGS.items():
        for text in spellings:
            if text in by_text:
                roles[role] = by_text[text]
                break
    return roles


def special_pairs(teacher: TokenizerView, student: TokenizerView) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Role-matched pairs of tokens, at least one side of which is special.

    Returns:
        ``(teacher_ids, student_ids, roles)``: two ``(S,)`` int64 arrays and the role of each pair, in
        :data:`ROLES` order. A pair already seen under an earlier role is not repeated.
    """
    t_roles = special_roles(teacher)
    s_roles = special_roles(student)
    t_out: list[int] = []
    s_out: list[int] = []
    names: list[str] = []
    seen: set[tuple[int, int]] = set()
    for role in ROLES:
        if role in t_roles and role in s_roles:
            pair = (t_roles[role], s_roles[role])
            special = pair[0] in teacher.special_ids or pair[1] in student.special_ids
            if pair not in seen and special:
                seen.add(pair)
                t_out.append(pair[0])
                s_out.append(pair[1])
                names.append(role)
    return np.asarray(t_out, dtype=np.int64), np.asarray(s_out, dtype=np.int64), names


def partners(source_ids: np.ndarray, target_ids: np.ndarray, *, source_special: frozenset[int]) -> dict[int, int]:
    """Source special id -> its first role partner (the earliest role wins)."""
    out: dict[int, int] = {}
    for s, t in zip(source_ids.tolist(), target_ids.tolist()):
        if s in source_special and s not in out:
            out[s] = t
    return out
