"""Pieces shared by several stages, below all of them in the import order.

The teacher fine-tune, the teacher cache and the distillation trainer all tokenise examples the
same way, read the same example sources and score predictions with the same task metrics. Those
pieces live here, so every stage imports *down* into ``pipeline.common`` and no stage imports
another sideways or upwards (``tests/test_layering.py`` enforces it). One of them is
:mod:`pipeline.common.encoder_outputs`: the forward pass that returns an encoder's logits,
hidden states and attention targets, run on the teacher by the cache writer and on the student
(and the online teacher) by the trainer -- one function for both, so cache-vs-online parity is a
matter of floating point only.
"""
