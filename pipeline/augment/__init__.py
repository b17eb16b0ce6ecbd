"""Stages ``WordVectors``, ``Candidates`` and ``Augment``: TinyBERT's data augmentation.

* :mod:`pipeline.augment.word_vectors` loads or trains GloVe-style vectors once and serves
  nearest-neighbour queries from a memory-mapped, normalised matrix;
* :mod:`pipeline.augment.mlm_candidates` asks a BERT masked LM for the candidates of one-piece
  words, many masked positions per forward, in the arithmetic ``mlm_precision`` names;
* :mod:`pipeline.augment.augmenter` plans the replacement positions, gathers candidates from
  both sources and samples N augmented copies per example (the algorithm);
* :mod:`pipeline.augment.candidates` stores every position's candidates once (the expensive
  half, independent of N, p and the seed), sharded and resumable;
* :mod:`pipeline.augment.sampling` samples the augmented split over those stored lists.
"""
