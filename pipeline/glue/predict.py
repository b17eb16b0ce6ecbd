"""Run a saved sequence classifier (a teacher or a stage-2 student) over a prepared split.

The GLUE table needs predictions the distillation stages do not save: the teacher's on dev
(for its interval), every model's on MNLI's mismatched dev set, and the selected student's on
the unlabelled test sets. The examples are tokenised with the model's own tokenizer (a student
ships its teacher's) and the cache's maximum length, and run in eval mode, no gradients.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def predict_table(model_dir: Path | str, table, max_seq_length: int, batch_size: int = 128,
                  device: str = "auto") -> np.ndarray:
    """Logits ``[N, C]`` of the model in ``model_dir`` for the rows of ``table`` (text_a, text_b)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.common.device import resolve_device
    from pipeline.common.encoders import model_inputs
    from pipeline.common.tokenize import pad_batch, tokenize_examples

    device_ = resolve_device(device)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).to(device_).eval()
    ids, types = tokenize_examples(tokenizer, table, max_seq_length)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))   # less padding
    out = [None] * len(ids)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            input_ids, token_types, mask = pad_batch([ids[i] for i in batch], [types[i] for i in batch],
                                                     tokenizer.pad_token_id or 0)
            logits = model(**model_inputs(model, input_ids.to(device_), token_types.to(device_),
                                          mask.to(device_))).logits.float().cpu().numpy()
            for row, i in enumerate(batch):
                out[i] = logits[row]
    width = int(model.config.num_labels)
    return np.asarray(out, dtype=np.float32).reshape(len(ids), width) if out else np.zeros((0, width), np.float32)
