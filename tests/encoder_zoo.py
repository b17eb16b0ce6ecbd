"""Tiny randomly initialised encoders of every supported family, with tokenizers built offline.

Each family gets a model from its own transformers config class (hidden 32, 4 heads, 4
layers) and the kind of tokenizer its hub checkpoints ship: the packaged bert-base-uncased
WordPiece vocabulary for BERT, ELECTRA and DistilBERT, and for the others a tiny byte-level
BPE (RoBERTa, DeBERTa v1, ModernBERT) or Unigram (XLM-R, DeBERTa-v3) vocabulary trained with
the ``tokenizers`` library on the test sentences, with the family's special tokens and pair
template (RoBERTa/XLM-R: ``<s> A </s></s> B </s>``, one token type; DeBERTa: ``[CLS] A [SEP]
B [SEP]`` with types 0/1; ModernBERT: no token types).
"""
from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

WORDS = "good bad movie plot actor great boring fun story scene long short film music".split()
SCHEMA = pa.schema([("id", pa.string()), ("text_a", pa.string()), ("text_b", pa.string()),
                    ("label", pa.int64())])
SST2 = {"task": "SST-2", "task_type": "classification", "label_names": ["negative", "positive"],
        "num_labels": 2}
LABELS = dict(num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
SIZE = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64)

#: family name -> (tokenizer kind, specials in id order, pair template, input names)
ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
BERT_SPECIALS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) for _ in range(n)]


def write_examples(path: Path, n: int, split: str, seed: int, pairs: bool = False) -> None:
    texts = sentences(2 * n, seed)
    rows = [{"id": f"{split}-{i}", "text_a": texts[i], "text_b": texts[n + i] if pairs else None,
             "label": i % 2} for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)


def _trained_tokenizer(kind: str, specials: list[str], roberta_template: bool, type_ids: bool,
                       input_names: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = sentences(200, 7) + [" ".join(WORDS)]
    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=specials[3]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=120, special_tokens=specials, unk_token=specials[3])
    tok.train_from_iterator(corpus, trainer)
    ids = {name: tok.token_to_id(name) for name in specials}
    if roberta_template:
        cls, sep = specials[0], specials[2]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} {sep} $B {sep}",
            special_tokens=[(cls, ids[cls]), (sep, ids[sep])])
    else:
        cls, sep = "[CLS]", "[SEP]"
        second = ":1" if type_ids else ""
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B{second} {sep}{second}",
            special_tokens=[(cls, ids[cls]), (sep, ids[sep])])
    names = dict(zip(("bos_token", "pad_token", "eos_token", "unk_token", "mask_token"), specials)) \
        if roberta_template else dict(zip(("pad_token", "cls_token", "sep_token", "unk_token", "mask_token"), specials))
    if roberta_template:
        names.update(cls_token=specials[0], sep_token=specials[2])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_input_names=input_names, **names)


def make_family(family: str, out: Path, minilm_dir: Path, seed: int = 0, overrides: dict | None = None,
                **size) -> Path:
    """Save a tiny ``<Family>ForSequenceClassification`` and its tokenizer to ``out``.

    DeBERTa-v2 and ModernBERT get an embedding table padded beyond the tokenizer, as their hub
    checkpoints have; ``overrides`` replace config fields (other variants of a family)."""
    import torch
    import transformers as T

    size = {**SIZE, **size}
    if family in ("bert", "electra", "distilbert"):
        tokenizer = T.AutoTokenizer.from_pretrained(minilm_dir)
        if family == "distilbert":
            tokenizer.model_input_names = ["input_ids", "attention_mask"]
    elif family in ("roberta", "xlm-roberta"):
        tokenizer = _trained_tokenizer("bpe" if family == "roberta" else "unigram", ROBERTA_SPECIALS,
                                       True, False, ["input_ids", "attention_mask"])
    elif family in ("deberta-v2", "deberta"):
        tokenizer = _trained_tokenizer("unigram" if family == "deberta-v2" else "bpe", BERT_SPECIALS,
                                       False, True, ["input_ids", "token_type_ids", "attention_mask"])
    elif family == "modernbert":
        tokenizer = _trained_tokenizer("bpe", BERT_SPECIALS, False, False, ["input_ids", "attention_mask"])
    else:
        raise ValueError(family)
    vocab = len(tokenizer)
    if family in ("deberta-v2", "modernbert"):
        vocab = -(-vocab // 64) * 64 + 64
    common = dict(vocab_size=vocab, pad_token_id=tokenizer.pad_token_id, **LABELS)
    if family == "bert":
        config = T.BertConfig(max_position_embeddings=64, **size, **common)
    elif family == "roberta":
        config = T.RobertaConfig(max_position_embeddings=66, type_vocab_size=1, bos_token_id=0,
                                 eos_token_id=2, **size, **common)
    elif family == "xlm-roberta":
        config = T.XLMRobertaConfig(max_position_embeddings=66, type_vocab_size=1, bos_token_id=0,
                                    eos_token_id=2, **size, **common)
    elif family == "electra":
        config = T.ElectraConfig(embedding_size=16, max_position_embeddings=64, **size, **common)
    elif family == "distilbert":
        config = T.DistilBertConfig(dim=size["hidden_size"], n_layers=size["num_hidden_layers"],
                                    n_heads=size["num_attention_heads"], hidden_dim=size["intermediate_size"],
                                    max_position_embeddings=64, **common)
    elif family == "deberta-v2":   # DeBERTa-v3's layout: shared keys, buckets, no absolute positions
        config = T.DebertaV2Config(max_position_embeddings=64, relative_attention=True,
                                   pos_att_type=["p2c", "c2p"], position_buckets=8,
                                   max_relative_positions=64, share_att_key=True,
                                   norm_rel_ebd="layer_norm", position_biased_input=False,
                                   type_vocab_size=0, **size, **common)
    elif family == "deberta":
        config = T.DebertaConfig(max_position_embeddings=64, relative_attention=True,
                                 pos_att_type=["c2p", "p2c"], type_vocab_size=2, **size, **common)
    else:  # ModernBERT: a window of +-2 tokens on the sliding layers, so the tests cross it
        config = T.ModernBertConfig(max_position_embeddings=64, local_attention=4,
                                    cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id,
                                    bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                                    **size, **common)
    for key, value in (overrides or {}).items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = T.AutoModelForSequenceClassification.from_config(config)
    model.config.tinykd_head_trained = True   # a test teacher: its random head is the "trained" one
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


ALL_FAMILIES = ("bert", "roberta", "xlm-roberta", "electra", "distilbert", "deberta-v2", "deberta",
                "modernbert")
