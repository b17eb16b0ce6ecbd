"""Every encoder family end to end on a tiny random model, offline (tests/encoder_zoo.py).

* the captured pre-softmax scores, softmaxed with the model's own mask (padding, and
  ModernBERT's sliding window), are the model's attention probabilities; the log-probability
  target is their logarithm;
* per family: cache -> stage 1 (teacher layers; cached and online teacher agree to 1e-6 in
  fp32) -> stage 2 -> exported student of the teacher's family -> ``transformers.pipeline``;
* fresh students of each family, the pair template of the teacher's tokenizer in the cache,
  and the bad inputs: an unknown family, ``scores`` where a family has none, a trainer asking
  for the other target, a student family that does not read the teacher's tokenizer.
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from distill.run import distill_from_cache
from distill.student import StudentSpec, build_student
from distill.trainer import recipe
from pipeline.cache.layer_map import cached_layers, layer_map
from pipeline.common.encoder_outputs import forward_internals
from pipeline.cache.writer import CacheSpec
from pipeline.cache.assemble import build_cache, write_shard_output
from pipeline.common.encoders import FAMILIES, family_of
from pipeline.errors import InputError
from tests.encoder_zoo import ALL_FAMILIES, SST2, make_family, write_examples

SCORE_FAMILIES = [f.name for f in FAMILIES if f.exposes_scores]


def target_of(family: str) -> str:
    return "scores" if family in SCORE_FAMILIES else "log_probs"


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: DeBERTa-v2 as its v2-xlarge checkpoints: separate position projections, absolute positions
#: too, a convolution after the first layer, content->position only
DEBERTA_V2_SEPARATE = dict(share_att_key=False, position_biased_input=True, type_vocab_size=2,
                           conv_kernel_size=3, pos_att_type=["c2p"], position_buckets=-1,
                           norm_rel_ebd="none")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, minilm_dir):
    root = tmp_path_factory.mktemp("zoo")
    models = {family: make_family(family, root / family, minilm_dir) for family in ALL_FAMILIES}
    models["deberta-v2-separate"] = make_family("deberta-v2", root / "deberta-v2-separate", minilm_dir,
                                                overrides=DEBERTA_V2_SEPARATE)
    return models


def model_mask(model, layer: int, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] pairs the layer attends to: real keys, within ModernBERT's window."""
    length = attention_mask.shape[1]
    allowed = attention_mask.bool()[:, None, None, :].expand(-1, 1, length, -1)
    if model.config.model_type == "modernbert" and model.config.layer_types[layer - 1] == "sliding_attention":
        pos = torch.arange(length)
        allowed = allowed & ((pos[:, None] - pos[None, :]).abs() <= model.config.sliding_window)
    return allowed


@pytest.mark.parametrize("family", ALL_FAMILIES + ("deberta-v2-separate",))
def test_captured_attention_is_what_the_model_softmaxes(zoo, family):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(zoo[family])
    model = AutoModelForSequenceClassification.from_pretrained(zoo[family]).eval()
    model.set_attn_implementation("eager")
    enc = tokenizer(["good movie with a great long story and fun music", "bad plot"],
                    ["short film", "boring actor in a long scene"], padding=True,
                    return_tensors="pt", return_token_type_ids=True)
    ids, types, mask = enc["input_ids"], enc["token_type_ids"], enc["attention_mask"]
    layers = list(range(1, model.config.num_hidden_layers + 1))
    adapter = family_of(model)
    with torch.no_grad():
        probs = model(**adapter.model_inputs(ids, types, mask), output_attentions=True).attentions
        log_probs = forward_internals(model, ids, types, mask, [], layers, attention_target="log_probs")
        scores = forward_internals(model, ids, types, mask, [], layers) if adapter.exposes_scores else None
    real = mask.bool()[:, None, :, None] & mask.bool()[:, None, None, :]
    for layer in layers:
        allowed = model_mask(model, layer, mask)
        expected = probs[layer - 1]
        assert torch.allclose(log_probs.scores[layer].exp()[real.expand_as(expected) & allowed.expand_as(expected)],
                              expected[real.expand_as(expected) & allowed.expand_as(expected)], atol=1e-6)
        if scores is not None:
            softmaxed = scores.scores[layer].masked_fill(~allowed, float("-inf")).softmax(-1)
            rows = mask.bool()[:, None, :, None].expand_as(expected)   # padded queries: any value
            assert torch.allclose(softmaxed[rows], expected[rows], atol=1e-6), family
            # pre-softmax means unnormalised: the rows are not log-probabilities already
            assert not torch.allclose(scores.scores[layer], log_probs.scores[layer], atol=1e-3)
    if family == "modernbert":   # the window is crossed: some real pairs are outside it
        assert not model_mask(model, 2, mask)[real[:, :1]].all()


def losses(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()
            if "eval" not in json.loads(line)]


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_family_runs_cache_stage1_stage2_export_and_pipeline(zoo, family, tmp_path):
    from transformers import AutoConfig, pipeline

    teacher = zoo[family]
    write_examples(tmp_path / "train.parquet", 16, "train", 0)
    (tmp_path / "prepared").mkdir()
    write_examples(tmp_path / "prepared" / "dev.parquet", 8, "dev", 1)
    mapped = layer_map(4, 2)
    hidden, attention = cached_layers(mapped)
    target = target_of(family)
    cache = tmp_path / "cache"
    build_cache(tmp_path / "train.parquet", teacher, cache,
                CacheSpec(hidden, attention, "float32", max_seq_length=24, attention_target=target),
                shard_size=16, task_info=SST2)
    info = json.loads((cache / "manifest.json").read_text())["info"]
    assert info["attention_target"] == target and info["teacher"]["family"] == family

    stage1 = recipe("intermediate", epochs=1, batch_size=8, device="cpu", seed=3, attention_target=target,
                    checkpoint_every=0, log_every=1)
    spec = StudentSpec(init="teacher_layers", num_layers=2, teacher_layers=mapped, seed=3)
    cached = distill_from_cache(cache, tmp_path / "s1", stage1, spec)
    online = distill_from_cache(cache, tmp_path / "s1-online", stage1,
                                StudentSpec(init="teacher_layers", num_layers=2, teacher_layers=mapped, seed=3),
                                online=True)
    assert cached["steps"] == online["steps"] == 2
    for a, b in zip(losses(tmp_path / "s1"), losses(tmp_path / "s1-online"), strict=True):
        for name in ("embedding", "hidden", "attention", "total"):
            assert a[name] == pytest.approx(b[name], rel=1e-6, abs=1e-9), (family, name)
        assert a["attention"] > 0

    stage2 = recipe("prediction", epochs=1, batch_size=8, device="cpu", eval_every=1, checkpoint_every=0)
    summary = distill_from_cache(cache, tmp_path / "s2", stage2, stage1_dir=tmp_path / "s1",
                                 prepared_dir=tmp_path / "prepared")
    assert summary["best"]["metrics"]["examples"] == 8
    student_dir = tmp_path / "s2" / "student"
    config = AutoConfig.from_pretrained(student_dir)
    assert config.model_type == AutoConfig.from_pretrained(teacher).model_type
    assert config.num_hidden_layers == 2
    classify = pipeline("text-classification", model=str(student_dir), device="cpu")
    predictions = classify(["a good fun movie", "a long boring plot"])
    assert [p["label"] in ("negative", "positive") for p in predictions] == [True, True]


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_fresh_student_of_each_family_is_smaller_and_reads_the_teachers_ids(zoo, family):
    from transformers import AutoConfig, AutoTokenizer

    teacher_config = AutoConfig.from_pretrained(zoo[family])
    spec = StudentSpec(init="config", num_layers=2, hidden_size=16, intermediate_size=32, num_heads=4)
    student = build_student(spec, teacher_config, 2, label_names=["negative", "positive"]).eval()
    assert student.config.model_type == teacher_config.model_type
    assert (student.config.num_hidden_layers, student.config.hidden_size) == (2, 16)
    tokenizer = AutoTokenizer.from_pretrained(zoo[family])
    enc = tokenizer(["good movie", "bad long boring plot"], padding=True, return_tensors="pt",
                    return_token_type_ids=True)
    if not family_of(student).exposes_scores:
        student.set_attn_implementation("eager")
    with torch.no_grad():
        out = forward_internals(student, enc["input_ids"], enc["token_type_ids"], enc["attention_mask"],
                                [0, 2], [1, 2], attention_target=target_of(family))
    assert out.logits.shape == (2, 2) and out.hidden[2].shape[-1] == 16
    assert out.scores[1].shape[1] == 4
    if family == "modernbert":   # a global layer, then the teacher's sliding ones
        assert student.config.layer_types == ["full_attention", "sliding_attention"]
    bert = build_student(StudentSpec(init="config", num_layers=2, hidden_size=16, intermediate_size=32,
                                     num_heads=4, family="bert"), teacher_config, 2)
    assert bert.config.model_type == "bert" and bert.config.vocab_size == teacher_config.vocab_size


def test_cache_uses_the_teachers_pair_template(zoo, tmp_path):
    """RoBERTa: <s> A </s></s> B </s>, one token type, padding with its own pad id (1)."""
    write_examples(tmp_path / "pairs.parquet", 4, "train", 0, pairs=True)
    spec = CacheSpec([0, 2], [2], "float32", 24)
    write_shard_output(tmp_path / "pairs.parquet", 0, 4, 0, zoo["roberta"], tmp_path / "out", spec,
                       task_info=SST2)
    table = pq.read_table(tmp_path / "out" / "shards" / "part-00000.parquet")
    for ids, types in zip(table.column("input_ids").to_pylist(), table.column("token_type_ids").to_pylist()):
        assert ids[0] == 0 and ids[-1] == 2 and set(types) == {0}
        first_sep = ids.index(2)
        assert ids[first_sep + 1] == 2 and 1 not in ids   # the double separator; no padding stored


def test_unknown_family_and_unavailable_scores_are_refused_before_anything_is_written(zoo, tmp_path, minilm_dir):
    from transformers import AlbertConfig, AlbertForSequenceClassification, AutoTokenizer

    write_examples(tmp_path / "train.parquet", 4, "train", 0)
    albert = tmp_path / "albert"
    AlbertForSequenceClassification(AlbertConfig(vocab_size=30522, embedding_size=16, hidden_size=32,
                                                 num_hidden_layers=2, num_attention_heads=4,
                                                 intermediate_size=64)).save_pretrained(albert)
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(albert)
    spec = CacheSpec([0, 2], [2], "float32", 24)
    with pytest.raises(InputError, match=r"no encoder adapter for model type 'albert'; supported model "
                                         r"types: bert, deberta, deberta-v2, distilbert, electra, "
                                         r"modernbert, roberta, xlm-roberta"):
        write_shard_output(tmp_path / "train.parquet", 0, 4, 0, albert, tmp_path / "a", spec)
    with pytest.raises(InputError, match="'deberta' .* cannot expose its pre-softmax attention scores.*"
                                         "attention_target = log_probs"):
        write_shard_output(tmp_path / "train.parquet", 0, 4, 0, zoo["deberta"], tmp_path / "b", spec)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_trainer_target_and_student_family_mismatches_are_refused(zoo, tmp_path):
    write_examples(tmp_path / "train.parquet", 8, "train", 0)
    cache = tmp_path / "cache"
    hidden, attention = cached_layers(layer_map(4, 2))
    build_cache(tmp_path / "train.parquet", zoo["bert"], cache, CacheSpec(hidden, attention, "float32", 24),
                shard_size=8, task_info=SST2)
    small = dict(num_layers=2, hidden_size=16, intermediate_size=32, num_heads=4)
    with pytest.raises(InputError, match="cache holds attention scores .* the trainer asked for log_probs"):
        distill_from_cache(cache, tmp_path / "a", recipe("intermediate", epochs=1, device="cpu",
                                                         attention_target="log_probs"), StudentSpec(**small))
    with pytest.raises(InputError, match="student family roberta does not match the teacher's tokenizer"):
        distill_from_cache(cache, tmp_path / "b", recipe("intermediate", epochs=1, device="cpu"),
                           StudentSpec(family="roberta", **small))
    with pytest.raises(InputError, match="student has 2 attention heads, the teacher 4"):
        distill_from_cache(cache, tmp_path / "c", recipe("intermediate", epochs=1, device="cpu"),
                           StudentSpec(**{**small, "num_heads": 2}))
    assert not any((tmp_path / name).exists() for name in "abc")


@pytest.mark.slow
def test_dag_with_a_modernbert_teacher_a_bert_mlm_and_log_probs(tmp_path, monkeypatch, minilm_dir,
                                                                 tiny_mlm_dir, isolated_workdir):
    """The whole Luigi DAG for a non-BERT teacher: fine-tune -> augment with a BERT MLM (its own
    tokenizer) -> cache tokenised with the teacher's BPE tokenizer -> two stages -> pipeline."""
    import luigi
    from luigi.configuration import LuigiConfigParser
    from transformers import AutoConfig, AutoTokenizer, pipeline

    import tasks.distill as distill_tasks
    from tests.tiny_dag import write_tsv

    teacher = make_family("modernbert", tmp_path / "teacher", minilm_dir)
    write_tsv(tmp_path / "train.tsv", 12, 0)
    write_tsv(tmp_path / "dev.tsv", 8, 1)
    config = tmp_path / "luigi.cfg"
    config.write_text(f"""
[PrepareData]
source = files
task = SST-2
train_file = {tmp_path / 'train.tsv'}
dev_file = {tmp_path / 'dev.tsv'}
columns = {{"text_a": "sentence", "label": "label"}}
[FineTuneTeacher]
teacher = {teacher}
finetune = always
epochs = 1
batch_size = 8
device = cpu
[Augment]
mode = tinybert
mlm_model = {tiny_mlm_dir}
num_aug = 2
aug_progress = false
[TeacherCache]
student_layers = 2
max_seq_length = 32
attention_target = log_probs
[DistillIntermediate]
attention_target = log_probs
student_hidden_size = 16
student_intermediate_size = 32
student_heads = 4
epochs = 1
batch_size = 8
device = cpu
[DistillPrediction]
epochs = 1
batch_size = 8
eval_every = 2
device = cpu
""")
    monkeypatch.setattr(LuigiConfigParser, "_config_paths", [str(config)])
    monkeypatch.setattr(LuigiConfigParser, "_instance", None)
    luigi.task_register.Register.clear_instance_cache()
    stage2 = distill_tasks.DistillPrediction()
    result = luigi.build([stage2], local_scheduler=True, detailed_summary=True, log_level="WARNING")
    assert result.status.name in ("SUCCESS", "SUCCESS_WITH_RETRY"), result.summary_text

    cache = distill_tasks.TeacherCache().output_dir()
    info = json.loads((cache / "manifest.json").read_text())["info"]
    assert info["attention_target"] == "log_probs" and info["teacher"]["family"] == "modernbert"
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    from tasks.augment import Augment

    examples = pq.read_table(Augment().output_dir() / "shards").to_pylist()
    assert info["examples"] == len(examples) > 12     # the originals and their augmented copies
    rows = {r["id"]: r for r in pq.read_table(cache / "shards").to_pylist()}
    for example in examples:
        assert rows[example["id"]]["input_ids"] == tokenizer(example["text_a"], truncation=True,
                                                           max_length=32)["input_ids"]
    student = stage2.output_dir() / "student"
    student_config = AutoConfig.from_pretrained(student)
    assert student_config.model_type == "modernbert" and student_config.num_hidden_layers == 2
    assert pipeline("text-classification", model=str(student), device="cpu")("good film")[0]["label"] \
        in student_config.id2label.values()
