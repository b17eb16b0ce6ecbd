"""General distillation: a bare pre-trained encoder on plain text, through the same cache,
producing a student that task distillation starts from."""
from __future__ import annotations

import json
import random

import pytest
import torch

from distill.run import distill_from_cache
from distill.student import StudentSpec, build_student
from distill.trainer import recipe
from pipeline.errors import InputError
from pipeline.cache.layer_map import cached_layers, layer_map
from pipeline.cache.writer import CacheSpec
from pipeline.cache.assemble import build_cache

WORDS = "the a movie film plot was is good bad great long story actor music scene".split()
STUDENT = dict(num_layers=2, hidden_size=32, intermediate_size=64, num_heads=4)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared machine the threads'
    barriers stall each other; one thread keeps these tests fast and steady."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def general(tmp_path_factory, minilm_dir):
    from transformers import AutoTokenizer, BertConfig, BertModel

    root = tmp_path_factory.mktemp("general")
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    torch.manual_seed(0)
    encoder = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=48, num_hidden_layers=4,
                                   num_attention_heads=4, intermediate_size=96, max_position_embeddings=64))
    encoder.save_pretrained(root / "encoder")
    tokenizer.save_pretrained(root / "encoder")
    rng = random.Random(0)
    (root / "corpus.txt").write_text("\n".join(
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))) for _ in range(40)) + "\n")
    hidden, attention = cached_layers(layer_map(4, 2))
    info = build_cache(root / "corpus.txt", root / "encoder", root / "cache",
                       CacheSpec(hidden, attention, "float16", max_seq_length=32, with_logits=False),
                       shard_size=20)
    assert info["with_logits"] is False
    summary = distill_from_cache(root / "cache", root / "student-out",
                                 recipe("intermediate", batch_size=8, epochs=2, device="cpu", log_every=1),
                                 StudentSpec(**STUDENT))
    return root, summary


def test_general_distillation_trains_on_plain_text(general):
    root, summary = general
    assert summary["steps"] == 10 and summary["examples"] == 40
    lines = [json.loads(l) for l in (root / "student-out" / "metrics.jsonl").read_text().splitlines()]
    assert {"embedding", "hidden", "attention"} <= set(lines[0]) and "prediction" not in lines[0]
    assert lines[-1]["total"] < lines[0]["total"]


def test_prediction_stage_refuses_a_cache_without_logits(general, tmp_path):
    root, _ = general
    with pytest.raises(InputError, match="needs teacher logits"):
        distill_from_cache(root / "cache", tmp_path / "x", recipe("prediction", batch_size=8, epochs=1,
                                                                  device="cpu"), StudentSpec(**STUDENT))


def test_task_distillation_starts_from_the_general_student(general):
    from transformers import AutoConfig, BertForSequenceClassification

    root, _ = general
    general_dir = root / "student-out" / "student"
    saved = BertForSequenceClassification.from_pretrained(general_dir)
    student = build_student(StudentSpec(init="checkpoint", checkpoint=str(general_dir)),
                            AutoConfig.from_pretrained(root / "encoder"), num_labels=3)
    assert student.config.num_labels == 3          # a new head for the task ...
    for name, value in saved.bert.state_dict().items():   # ... on the general encoder
        assert torch.equal(value, student.bert.state_dict()[name]), name
