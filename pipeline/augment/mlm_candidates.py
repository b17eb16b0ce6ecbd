"""Masked-language-model replacement candidates, batched across positions and sentences.

For a word that BERT keeps as one word piece, TinyBERT's reference asks the MLM for
replacements with a *pair* input:

    [CLS] <sentence pieces, that word replaced by [MASK]> [SEP] <original sentence pieces> [SEP]

with segment ids 0 for ``[CLS]`` .. first ``[SEP]`` and 1 after it, takes the ``M`` highest
logits at the mask and drops the pieces that start with ``##``. Everything else it returns is
kept, on purpose: the original word, punctuation, ``[UNK]`` and other special tokens can all
be candidates (we mirror that exactly).

The reference runs one forward at batch size 1 per word, with autograd on. Here every query
of a shard becomes one row of a length-sorted batch, run under ``torch.inference_mode``;
the encoder runs on all tokens but the vocabulary projection (the MLM head, a third of
BERT-base's per-token FLOPs at this size) only on the one masked position per row.

Pairs longer than the model's maximum (the reference cut the pair at 512 tokens and could not
handle a mask beyond it) are cut to a *window* of the sentence's pieces around the masked word,
the same window on both sides of ``[SEP]``, as large as fits.

A checkpoint whose MLM head was not in the checkpoint (a sentence-embedding BERT loads with
``cls.predictions.*`` newly initialised) would propose random words; it is refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from pipeline.errors import InputError


@dataclass(frozen=True)
class MaskQuery:
    """One masked position: the sentence's piece ids and the piece span ``[start, end)`` to mask."""

    piece_ids: tuple[int, ...]
    start: int
    end: int


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_masked_lm(name_or_path: str, device: str = "auto"):
    """Load ``(model, tokenizer)`` from a hub name or a local directory; refuse untrained heads."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    try:
        model, info = AutoModelForMaskedLM.from_pretrained(name_or_path, output_loading_info=True)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load a masked-language model: {exc}", name_or_path) from None
    prefix = model.base_model_prefix
    head_missing = sorted(k for k in info.get("missing_keys", ())
                          if not k.startswith(prefix + ".") and "position_ids" not in k)
    if head_missing:
        raise InputError(
            "this checkpoint has no trained masked-LM head (missing from the checkpoint: "
            f"{', '.join(head_missing[:4])}{' ...' if len(head_missing) > 4 else ''}); it is "
            "probably an encoder fine-tuned for something else (e.g. sentence embeddings). "
            "Use a pre-trained MLM checkpoint such as bert-base-uncased, or mode=glove",
            name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    for name in ("cls_token", "sep_token", "mask_token"):
        if getattr(tokenizer, name, None) is None:
            raise InputError(f"the tokenizer has no {name}; the pair input needs "
                             "[CLS]/[SEP]/[MASK]-style special tokens", name_or_path)
    model.eval()
    model.to(pick_device(device))
    return model, tokenizer


def max_input_length(model, tokenizer) -> int:
    """Longest input the model accepts: its position table, or the tokenizer's limit if smaller."""
    limit = int(getattr(model.config, "max_position_embeddings", 512) or 512)
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if tokenizer_limit and tokenizer_limit < 100_000:
        limit = min(limit, int(tokenizer_limit))
    return limit


def pair_input(query: MaskQuery, cls_id: int, sep_id: int, mask_id: int, max_length: int
               ) -> tuple[list[int], int, int, bool]:
    """Build ``(input_ids, first_segment_length, mask_index, windowed)`` for one query."""
    pieces, start, end = query.piece_ids, query.start, query.end
    n, span = len(pieces), end - start
    windowed = False
    if 2 * n - span + 4 > max_length:
        # Same window of pieces on both sides, centred on the masked word, as wide as fits.
        width = max(span, (max_length - 4 + span) // 2)
        if 2 * width - span + 4 > max_length:
            raise InputError(f"the model accepts only {max_length} tokens: too few for a "
                             f"{span}-piece word in a pair input")
        first = max(0, start - (width - span) // 2)
        last = min(n, first + width)
        first = max(0, last - width)
        pieces, start, end = pieces[first:last], start - first, end - first
        windowed = True
    masked = list(pieces[:start]) + [mask_id] + list(pieces[end:])
    ids = [cls_id] + masked + [sep_id] + list(pieces) + [sep_id]
    return ids, len(masked) + 2, 1 + start, windowed


class MaskedLMCandidates:
    """Top-``M`` MLM candidates for many :class:`MaskQuery` at once."""

    def __init__(self, model, tokenizer, top_m: int = 15, batch_size: int = 64,
                 max_length: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.top_m = top_m
        self.batch_size = batch_size
        self.max_length = max_length or max_input_length(model, tokenizer)
        self.cls_id = tokenizer.cls_token_id
        self.sep_id = tokenizer.sep_token_id
        self.mask_id = tokenizer.mask_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.uses_segments = int(getattr(model.config, "type_vocab_size", 0) or 0) >= 2
        self._token_cache: dict[int, str] = {}
        self._split = self._split_head(model)
        self.windowed = 0
        self.forwards = 0
        self.forward_seconds = 0.0

    @staticmethod
    def _split_head(model):
        """(encoder, head) when the model exposes them, so the head runs on mask rows only."""
        base = getattr(model, "base_model", None)
        for name in ("cls", "lm_head"):
            head = getattr(model, name, None)
            if base is not None and base is not model and head is not None:
                return base, head
        return None

    def _logits_at_masks(self, ids, segments, attention, mask_positions):
        import torch

        rows = torch.arange(ids.shape[0], device=ids.device)
        kwargs = {"input_ids": ids, "attention_mask": attention}
        if self.uses_segments:
            kwargs["token_type_ids"] = segments
        if self._split is not None:
            encoder, head = self._split
            hidden = encoder(**kwargs).last_hidden_state
            return head(hidden[rows, mask_positions])
        return self.model(**kwargs).logits[rows, mask_positions]

    def _token(self, token_id: int) -> str:
        token = self._token_cache.get(token_id)
        if token is None:
            token = self._token_cache[token_id] = self.tokenizer.convert_ids_to_tokens(token_id)
        return token

    def candidates(self, queries: Sequence[MaskQuery]) -> list[list[str]]:
        """Candidate tokens per query, in rank order, ``##`` pieces dropped.

        Identical queries (the same sentence repeated in the data) are computed once.
        """
        distinct = list(dict.fromkeys(queries))
        if len(distinct) < len(queries):
            found = dict(zip(distinct, self._distinct_candidates(distinct)))
            return [found[query] for query in queries]
        return self._distinct_candidates(queries)

    def _distinct_candidates(self, queries: Sequence[MaskQuery]) -> list[list[str]]:
        import time

        import torch

        built = []
        for query in queries:
            ids, first_len, mask_at, windowed = pair_input(
                query, self.cls_id, self.sep_id, self.mask_id, self.max_length)
            self.windowed += windowed
            built.append((ids, first_len, mask_at))
        order = sorted(range(len(built)), key=lambda i: len(built[i][0]))
        results: list[list[str]] = [[] for _ in built]
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                width = len(built[chunk[-1]][0])
                ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
                segments = torch.zeros((len(chunk), width), dtype=torch.long)
                attention = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, index in enumerate(chunk):
                    seq, first_len, _ = built[index]
                    ids[row, :len(seq)] = torch.tensor(seq)
                    segments[row, first_len:len(seq)] = 1
                    attention[row, :len(seq)] = 1
                mask_positions = torch.tensor([built[i][2] for i in chunk])
                began = time.perf_counter()
                logits = self._logits_at_masks(ids.to(device), segments.to(device),
                                               attention.to(device), mask_positions.to(device))
                top = torch.topk(logits, self.top_m, dim=-1).indices.cpu().tolist()
                self.forward_seconds += time.perf_counter() - began
                self.forwards += len(chunk)
                for row, index in enumerate(chunk):
                    results[index] = [tok for tok in map(self._token, top[row])
                                      if not tok.startswith("##")]
        return results
