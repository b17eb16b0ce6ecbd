"""Plain-PyTorch bounds for the GPU check: the same models and batches with no pipeline around them.

A figure of the DAG (``scripts/gpu_check.py``) says little alone: 8,400 examples/s is good or
bad depending on what the hardware can do with the same models. These bounds are measured in
the same process, right after the DAG, on the same device and in the same arithmetic (bf16
autocast on CUDA, as the DAG's ``[TeacherCache] autocast = bf16`` and ``[DistillIntermediate]
amp = true``; fp32 on the CPU dry run), and on the same batches: the token ids of the cache's
own first batches in the trainer's deterministic plan (so the same rows and widths the DAG's
trainer sees, length-bucketed; the teacher forward's at the writer's forward batch size).

* **bare teacher forward**: the teacher (eager attention) with ``output_hidden_states`` and
  ``output_attentions``, as the cache writer needs them, under ``no_grad``; nothing is copied
  back to the host. The writer's bound.
* **student step**: the student's encoder (eager attention), a shared linear projection of its
  hidden states to the teacher's width, MSE to the teacher's hidden states (embedding layer
  included) and attention maps of the mapped layers, backward, gradient clipping at 1.0, fused
  AdamW (on CUDA), with the targets already on the device. The bound of the trainer on
  batches already on the device; its examples/s is what a reader has to deliver.
* **live teacher + step**: the teacher's forward, then the step on its outputs: the bound of
  the online epoch. ``online_over_cache`` (its time over the step's) is what reading the
  cache can save at best with these models, beside the FLOP bound of that ratio.

The models have random weights: speed does not depend on them.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Sequence

import torch

#: Calls before timing (allocator, cuBLAS heuristics, autocast caches).
WARMUP_CALLS = 3


def autocast_on(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when ``enabled``; nothing elsewhere (the dry run is fp32)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def examples_per_s(run: Callable[[torch.Tensor, torch.Tensor], None],
                   batches: Sequence[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> float:
    """Examples per second of ``run`` over ``batches`` (after a few warm-up calls)."""
    for ids, mask in batches[:WARMUP_CALLS]:
        run(ids, mask)
    synchronize(device)
    started = time.perf_counter()
    for ids, mask in batches:
        run(ids, mask)
    synchronize(device)
    return sum(int(ids.shape[0]) for ids, _ in batches) / (time.perf_counter() - started)


def eager_encoder(config) -> torch.nn.Module:
    """The bare encoder of ``config`` (a teacher's or student's), eager attention, random weights."""
    from transformers import AutoModel

    return AutoModel.from_config(config, attn_implementation="eager")


def plain_bounds(teacher_config, student_config, mapped: Sequence[int],
                 step_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 forward_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 device: torch.device, autocast: bool) -> dict:
    """The three bounds (module text), in examples/s, with the batches' mean width.

    ``mapped[i]`` is the teacher layer (1-based) of student layer i+1; hidden states of layer 0
    (the embeddings) are matched too. ``step_batches`` and ``forward_batches`` are (input_ids,
    attention_mask) pairs already on ``device``.
    """
    torch.manual_seed(0)
    teacher = eager_encoder(teacher_config).to(device).eval()
    hidden_layers = [0] + list(mapped)

    def teacher_outputs(ids, mask):
        with torch.no_grad(), autocast_on(device, autocast):
            return teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                           output_attentions=True)

    forward = examples_per_s(teacher_outputs, forward_batches, device)

    student = eager_encoder(student_config).to(device).train()
    projection = torch.nn.Linear(student_config.hidden_size, teacher_config.hidden_size).to(device)
    params = list(student.parameters()) + list(projection.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    targets: dict[tuple, tuple[list, list]] = {}

    def cached_targets(ids):
        """Random teacher targets of this batch's shape, made once per shape (already on the device)."""
        rows, width = ids.shape
        if (rows, width) not in targets:
            hidden = [torch.randn(rows, width, teacher_config.hidden_size, device=device) for _ in hidden_layers]
            scores = [torch.rand(rows, teacher_config.num_attention_heads, width, width, device=device)
                      for _ in mapped]
            targets[(rows, width)] = (hidden, scores)
        return targets[(rows, width)]

    def step(ids, mask, hidden=None, scores=None):
        if hidden is None:
            hidden, scores = cached_targets(ids)
        with autocast_on(device, autocast):
            out = student(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
            loss = sum(torch.nn.functional.mse_loss(projection(h).float(), t)
                       for h, t in zip(out.hidden_states, hidden))
            loss = loss + sum(torch.nn.functional.mse_loss(a.float(), t) for a, t in zip(out.attentions, scores))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def online_step(ids, mask):
        out = teacher_outputs(ids, mask)
        step(ids, mask, [out.hidden_states[i].float() for i in hidden_layers],
             [out.attentions[i - 1].float() for i in mapped])

    cached = examples_per_s(step, step_batches, device)
    online = examples_per_s(online_step, step_batches, device)
    width = sum(int(ids.shape[1]) for ids, _ in step_batches) / len(step_batches)
    return {"teacher_forward_examples_per_s": round(forward, 1),
            "forward_batch_size": int(forward_batches[0][0].shape[0]),
            "student_step_examples_per_s": round(cached, 1),
            "online_step_examples_per_s": round(online, 1),
            "online_over_cache": round(cached / online, 3),
            "batch_size": int(step_batches[0][0].shape[0]), "steps": len(step_batches),
            "mean_width": round(width, 1),
            "arithmetic": "bf16 autocast" if autocast and device.type == "cuda" else "fp32"}
