"""Tied input and output embeddings: one tensor on disk (often no ``lm_head.weight`` at all)
that the model uses twice.

An adapter changes the two uses separately: LoRA or ``modules_to_save`` on ``lm_head`` changes
only the output head, LoRA on ``embed_tokens`` only the input embedding. Merging either through
the shared tensor would silently change the other, so such a merge writes both tensors and
sets ``tie_word_embeddings: false``. Changes PEFT makes to the shared parameter itself (a saved
``.base_layer`` tensor, trainable tokens) reach both uses; when those are the only changes the
model stays tied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..formats.safetensors import TensorInfo
from .model import MergeOp

# (input embedding, output head) tensor names of the families that tie them.
TIED_PAIRS: tuple[tuple[str, str], ...] = (
    ("model.embed_tokens.weight", "lm_head.weight"),
    ("transformer.wte.weight", "lm_head.weight"),
    ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"),
    ("model.language_model.embed_tokens.weight", "lm_head.weight"),
    ("model.decoder.embed_tokens.weight", "lm_head.weight"),
    ("gpt_neox.embed_in.weight", "embed_out.weight"),
)


@dataclass(frozen=True)
class TiedEmbeddings:
    embedding: str
    head: str
    stored: bool  # the checkpoint holds the head tensor as well

    def virtual_head(self, base: dict[str, TensorInfo]) -> TensorInfo | None:
        """The head as a tensor to map adapter names to, read from the embedding's bytes."""
        if self.stored:
            return None
        source = base[self.embedding]
        return TensorInfo(self.head, source.dtype, source.shape, source.begin, source.end)


def tie_flag(config: dict[str, Any] | None) -> bool | None:
    if not config:
        return None
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    text = config.get("text_config")
    if isinstance(text, dict) and "tie_word_embeddings" in text:
        return bool(text["tie_word_embeddings"])
    return None


def find_tied(config: dict[str, Any] | None, base: dict[str, TensorInfo]) -> TiedEmbeddings | None:
    """The tied pair, if the config says so or the checkpoint has an embedding but no head."""
    declared = tie_flag(config)
    for embedding, head in TIED_PAIRS:
        if embedding not in base:
            continue
        stored = head in base
        if declared or (declared is None and not stored):
            if stored and base[head].shape != base[embedding].shape:
                return None
            return TiedEmbeddings(embedding, head, stored)
        return None
    return None


def split_uses(tied: TiedEmbeddings, ops: dict[str, list[MergeOp]]) -> bool:
    """Give each use the changes that reach it; True when the two uses now differ.

    ``ops`` is updated in place: a change to the shared parameter found on one use is added to
    the other, unless that adapter already changes the other use in the same way.
    """
    embedding, head = ops.get(tied.embedding, []), ops.get(tied.head, [])
    for source, target in ((list(embedding), head), (list(head), embedding)):
        for op in source:
            if op.layout == "shared" and not any(o.adapter == op.adapter and o.kind == op.kind for o in target):
                target.append(op)
    for tensor_ops in (embedding, head):
        tensor_ops.sort(key=lambda op: (op.adapter, op.kind != "replace", op.layout != "shared"))
    if embedding:
        ops[tied.embedding] = embedding
    if head:
        ops[tied.head] = head
    return embedding != head
