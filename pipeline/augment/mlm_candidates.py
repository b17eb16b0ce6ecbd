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

**Precision** (``mlm_precision``, :data:`PRECISIONS`). The encoder forward is the whole cost of
augmentation, so it can run in cheaper arithmetic: ``int8`` (CPU: ``torch.ao`` dynamic
quantisation of the encoder's linear layers: int8 weights, activations quantised per batch
tensor), ``bf16`` (autocast; on a CPU only where it has native bf16 instructions, otherwise it
is slower than fp32 and refused) and ``fp16`` (CUDA autocast). The vocabulary projection (one
row per query, under 1 % of the FLOPs) always runs in fp32 on the encoder's output, so the top
``M`` is not decided among logits rounded to 8 mantissa bits. Cheaper arithmetic changes which
candidates come out at some positions: the precision is part of the Candidates stage's
identity, and ``scripts/bench_augment.py`` measures how often the top-``M`` set and order agree
with fp32. int8's per-tensor activation scale couples the rows of a batch, so with int8 the
batch size (and composition) is part of the result too.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Sequence

from pipeline.common.loading import load_pretrained
from pipeline.errors import InputError

#: ``mlm_precision`` values: fp32 (the reference arithmetic), bf16 (CUDA, or a CPU with native
#: bf16), fp16 (CUDA only), int8 (CPU only: dynamic quantisation of the encoder's linear layers).
PRECISIONS = ("fp32", "bf16", "fp16", "int8")


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
        # a pre-training checkpoint's next-sentence head and pooler are left out on purpose
        model, report = load_pretrained(AutoModelForMaskedLM, name_or_path, new_head=True, partial=True)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load a masked-language model: {exc}", name_or_path) from None
    head_missing = report.new_head_keys
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


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 / AMX) that oneDNN uses."""
    import torch

    checker = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(torch.backends.mkldnn.is_available() and checker is not None and checker())


def quantize_linear_layers(module):
    """A copy of ``module`` with every ``nn.Linear`` dynamically quantised to int8 (torch.ao).

    ``torch.ao.quantization`` warns that it is deprecated in favour of torchao; in torch 2.13
    it is still the built-in way, and the warning would otherwise print once per shard.
    """
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated.*")
        return torch.ao.quantization.quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8)


def check_precision(precision: str, device_type: str, *, allow_emulated_bf16: bool = False) -> None:
    """Refuse a precision the device cannot run (one clear error, never a silent fallback)."""
    import torch

    if precision not in PRECISIONS:
        raise InputError(f"unknown mlm_precision {precision!r}; choose one of {PRECISIONS}")
    if precision == "int8" and device_type != "cpu":
        raise InputError("mlm_precision=int8 (dynamic quantisation) runs on the CPU only; on "
                         "CUDA use fp16 or bf16")
    if precision == "fp16" and device_type != "cuda":
        raise InputError("mlm_precision=fp16 is CUDA autocast; on a CPU use int8 (or bf16 "
                         "where the CPU has native bf16)")
    if precision == "bf16":
        if device_type == "cuda" and not torch.cuda.is_bf16_supported():
            raise InputError("mlm_precision=bf16: this GPU does not support bf16; use fp16")
        if device_type == "cpu" and not cpu_has_native_bf16() and not allow_emulated_bf16:
            raise InputError("mlm_precision=bf16: this CPU has no native bf16 instructions "
                             "(AVX512-BF16/AMX), so bf16 would be slower than fp32; use int8")


def candidate_agreement(reference: Sequence[Sequence[str]], other: Sequence[Sequence[str]]
                        ) -> dict[str, float | int]:
    """How often ``other``'s candidate list equals ``reference``'s, as a set and in order."""
    if len(reference) != len(other):
        raise ValueError(f"{len(reference)} reference lists, {len(other)} to compare")
    same_set = sum(set(a) == set(b) for a, b in zip(reference, other))
    same_order = sum(list(a) == list(b) for a, b in zip(reference, other))
    total = len(reference)
    return {"positions": total, "same_set": same_set / total if total else 1.0,
            "same_order": same_order / total if total else 1.0}


def _full_precision(tensor):
    """An autocast result (bf16/fp16) back in fp32; fp32 and fp64 tensors as they are."""
    import torch

    return tensor.float() if tensor.dtype in (torch.bfloat16, torch.float16) else tensor


class MaskedLMCandidates:
    """Top-``M`` MLM candidates for many :class:`MaskQuery` at once."""

    def __init__(self, model, tokenizer, top_m: int = 15, batch_size: int = 64,
                 max_length: int | None = None, precision: str = "fp32", *,
                 allow_emulated_bf16: bool = False):
        self.device_type = next(model.parameters()).device.type
        check_precision(precision, self.device_type, allow_emulated_bf16=allow_emulated_bf16)
        self.precision = precision
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
        if precision == "int8":
            # The encoder only: the head stays fp32 (see the module docstring).
            if self._split is not None:
                self._split = (quantize_linear_layers(self._split[0]), self._split[1])
            else:
                self.model = quantize_linear_layers(model)
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

    def _autocast(self):
        """The autocast context of bf16/fp16 (int8 and fp32 need none)."""
        import torch

        if self.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast(self.device_type, dtype=dtype)
        return contextlib.nullcontext()

    def _logits_at_masks(self, ids, segments, attention, mask_positions):
        import torch

        rows = torch.arange(ids.shape[0], device=ids.device)
        kwargs = {"input_ids": ids, "attention_mask": attention}
        if self.uses_segments:
            kwargs["token_type_ids"] = segments
        if self._split is not None:
            encoder, head = self._split
            with self._autocast():
                hidden = encoder(**kwargs).last_hidden_state[rows, mask_positions]
            return head(_full_precision(hidden))
        with self._autocast():
            logits = self.model(**kwargs).logits[rows, mask_positions]
        return _full_precision(logits)

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
