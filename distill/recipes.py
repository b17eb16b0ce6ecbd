"""The default recipes (docs/ALGORITHM.md §2.8) of the distillation stages, as plain data.

Kept free of torch so the Luigi wiring (tasks/distill.py) can take its parameter defaults from
here without slowing down a no-op rerun; :func:`distill.trainer.recipe` builds a
``TrainConfig`` from the same dicts.

* ``intermediate`` (task stage 1 and general distillation): embedding + attention + hidden
  losses, lr 5e-5 constant, 10 epochs (CoLA: 50), batch 32.
* ``prediction`` (task stage 2): the prediction loss only, lr 3e-5 (the paper searches
  {1, 2, 3}e-5), 3 epochs, 10 % linear warm-up then linear decay, batch 32, dev evaluation
  every 50 steps.
"""
from __future__ import annotations

RECIPES: dict[str, dict] = {
    "intermediate": dict(embedding_weight=1.0, attention_weight=1.0, hidden_weight=1.0,
                         prediction_weight=0.0, learning_rate=5e-5, epochs=10, batch_size=32,
                         schedule="constant", warmup_proportion=0.0, eval_every=0),
    "prediction": dict(embedding_weight=0.0, attention_weight=0.0, hidden_weight=0.0,
                       prediction_weight=1.0, learning_rate=3e-5, epochs=3, batch_size=32,
                       schedule="linear", warmup_proportion=0.1, eval_every=50),
}
