"""The Candidates stage: the two-stage augmentation writes the bytes the single-stage one wrote,
a new N, p or seed reruns only the sampling, and the MLM precision is part of the candidates'
identity."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.augment.augmenter import AugmentConfig, AugmentResources
from pipeline.augment.candidates import candidates_split, read_candidates
from pipeline.augment.sampling import augment_split
from pipeline.errors import InputError
from pipeline.stage import load_manifest
from tests.test_augment import (SENTENCES, configured, glove_dir, one_torch_thread,  # noqa: F401
                                run_luigi, split_table, write_sst2)

EDGE_CASES = ["", "Über naïve café crème brûlée 東京 😀", "zyzzyvaqq flurbbish grommetxx",
              "the of and to it", "Paris is lovely in the springtime, said the gallant musketeer."]


def single_stage_augment(table, out_dir: Path, config, resources, examples_per_shard: int):
    """The Augment stage as it was before the Candidates stage existed (main at f8fc8a6:
    ``augment_split`` without its resume branch): one augmenter, candidates and sampling per
    shard, counts in the metadata. Built from the functions that remain, so it stays runnable."""
    import pyarrow.parquet as pq

    from pipeline.augment.augmenter import (COUNTS_METADATA_KEY, build_augmenter, output_schema,
                                            shard_path)
    from pipeline.stage import write_file_atomic

    (out_dir / "shards").mkdir(parents=True)
    schema = output_schema(table.schema.field("label").type)
    augmenter = build_augmenter(config, resources)
    total, counts = table.num_rows, Counter()
    for shard in range(max(1, -(-total // examples_per_shard))):
        begin, end = shard * examples_per_shard, min(total, (shard + 1) * examples_per_shard)
        before = Counter(augmenter.counts)
        rows = augmenter.augment(table.slice(begin, end - begin).to_pylist())
        shard_counts = dict(augmenter.counts - before)
        out = pa.Table.from_pylist(rows, schema=schema).replace_schema_metadata(
            {COUNTS_METADATA_KEY: json.dumps(shard_counts, sort_keys=True).encode()})
        write_file_atomic(shard_path(out_dir, shard),   # with the page CRCs of Augment v3
                          lambda tmp: pq.write_table(out, tmp, compression="zstd",
                                                     write_page_checksum=True))
        counts.update(shard_counts)
    return dict(sorted(counts.items()))


@pytest.mark.parametrize("mode, pairs", [("tinybert", False), ("glove", True), ("mlm", True)])
def test_two_stage_output_is_byte_identical_to_the_single_stage_one(
        mode, pairs, tmp_path, glove_dir, tiny_mlm_dir):
    table = split_table(SENTENCES * 2 + EDGE_CASES, pairs=pairs)
    config = AugmentConfig(mode=mode, n_attempts=7, p=0.3, seed=11)
    resources = AugmentResources(vectors_dir=glove_dir, mlm_model=str(tiny_mlm_dir), batch_size=5)
    expected = single_stage_augment(table, tmp_path / "single", config, resources, 6)
    found = candidates_split(table, tmp_path / "candidates", config, resources,
                             examples_per_shard=6, progress=False)
    result = augment_split(table, tmp_path / "candidates", tmp_path / "two", config,
                           progress=False)
    files = sorted(p.name for p in (tmp_path / "single" / "shards").iterdir())
    assert len(files) == 4
    assert sorted(p.name for p in (tmp_path / "two" / "shards").iterdir()) == files
    for name in files:  # rows, schema, counts metadata, compression: every byte
        assert ((tmp_path / "two" / "shards" / name).read_bytes()
                == (tmp_path / "single" / "shards" / name).read_bytes()), name
    assert result["counts"] == expected
    assert found["counts"] == {k: v for k, v in expected.items() if not k.startswith("examples_")}
    # The stored candidates: one row per side, in example order, the source of each position.
    stored = read_candidates(tmp_path / "candidates")
    assert stored.num_rows == table.num_rows * (2 if pairs else 1)
    sources = Counter(s for row in stored.column("sources").to_pylist() for s in row)
    assert sources["mlm"] == expected.get("positions_mlm", 0)
    assert sources["glove"] == expected.get("positions_glove", 0)
    # An empty list where a source had nothing (the sampling keeps the word there).
    empty = sum(1 for row in stored.column("candidates").to_pylist() for c in row if not c)
    assert empty == sum(v for k, v in expected.items() if k.startswith("positions_without"))


def test_sampling_refuses_candidates_of_other_examples(tmp_path, glove_dir):
    config = AugmentConfig(mode="glove", n_attempts=3)
    table = split_table(SENTENCES)
    candidates_split(table, tmp_path / "candidates", config, AugmentResources(vectors_dir=glove_dir),
                     examples_per_shard=3, progress=False)
    with pytest.raises(InputError, match="cover 8 examples, the split has 7"):
        augment_split(table.slice(0, 7), tmp_path / "candidates", tmp_path / "out", config,
                      progress=False)
    renamed = table.set_column(0, "id", pa.array([f"other-{i}" for i in range(8)]))
    with pytest.raises(InputError, match=r"part-00000\.parquet.*expected 'other-0'"):
        augment_split(renamed, tmp_path / "candidates", tmp_path / "out2", config, progress=False)


# --- Luigi: a new N, p or seed reruns only the sampling ------------------------------------

def summary_block(summary_text: str, header: str) -> dict[str, int]:
    """Task family -> count from one block ("complete ones were encountered", "ran
    successfully") of Luigi's execution summary."""
    lines = summary_text.splitlines()
    start = next((i for i, line in enumerate(lines) if header in line), None)
    found: dict[str, int] = {}
    if start is None:
        return found
    for line in lines[start + 1:]:
        if not line.startswith("    - "):
            break
        count, family = line.split()[1], line.split()[2].split("(")[0]
        found[family] = int(count)
    return found


@pytest.mark.slow
def test_new_sampling_settings_rerun_only_augment(tmp_path, tiny_mlm_dir, monkeypatch):
    import pipeline.augment.mlm_candidates as mlm_candidates

    glue = write_sst2(tmp_path / "glue", SENTENCES)
    common = ["--mode", "tinybert", "--mlm-model", str(tiny_mlm_dir), "--examples-per-shard", "3",
              "--aug-progress", "false", "--PrepareData-source", "glue",
              "--PrepareData-glue-dir", str(glue), "--PrepareData-task", "SST-2"]
    with configured("Augment", *common) as first:
        assert run_luigi(first).status.name == "SUCCESS"
        candidates_dir = first.requires()["candidates"].output_dir()

    def no_model(*args, **kwargs):
        raise AssertionError("the sampling stage loaded the masked LM")

    monkeypatch.setattr(mlm_candidates, "load_masked_lm", no_model)
    outputs = {first.output_dir()}
    for change in (["--num-aug", "5"], ["--aug-p", "0.2"], ["--aug-seed", "7"]):
        with configured("Augment", *common, *change) as task:
            result = run_luigi(task)
            assert result.status.name == "SUCCESS", result.summary_text
            assert task.requires()["candidates"].output_dir() == candidates_dir
        # (Luigi does not look behind a complete task: WordVectors is not even scheduled.)
        assert summary_block(result.summary_text, "complete ones were encountered") == {
            "Candidates": 1, "PrepareData": 1}, result.summary_text
        assert summary_block(result.summary_text, "ran successfully") == {"Augment": 1}
        outputs.add(task.output_dir())
    assert len(outputs) == 4                  # four samplings ...
    assert [p.name for p in (Path(candidates_dir).parent).iterdir()   # ... of one candidates
            if not p.name.startswith(".")] == [candidates_dir.name]


def test_precision_and_stopwords_are_part_of_the_candidates_identity(tmp_path, tiny_mlm_dir):
    data = ["--PrepareData-source", "glue", "--PrepareData-glue-dir",
            str(write_sst2(tmp_path / "glue", SENTENCES)), "--PrepareData-task", "SST-2"]
    fingerprints = {}
    for mode, precision, batch in (("tinybert", "fp32", "64"), ("tinybert", "fp32", "8"),
                                   ("tinybert", "int8", "64"), ("tinybert", "int8", "8"),
                                   ("tinybert", "bf16", "64"), ("glove", "fp32", "64"),
                                   ("glove", "int8", "64")):
        with configured("Augment", "--mode", mode, "--mlm-model", str(tiny_mlm_dir),
                        "--mlm-precision", precision, "--aug-batch-size", batch, *data) as task:
            candidates = task.requires()["candidates"]
            fingerprints[mode, precision, batch] = (candidates.fingerprint(), task.fingerprint())
            assert "stopwords" in candidates.stage_key().inputs
    distinct = {key: value[0] for key, value in fingerprints.items()}
    # fp32: the batch size changes nothing but float noise, so it is not part of the identity
    assert distinct["tinybert", "fp32", "64"] == distinct["tinybert", "fp32", "8"]
    # int8: another arithmetic, and its per-batch scales make the batch size count too
    assert len({distinct["tinybert", p, b] for p, b in (("fp32", "64"), ("int8", "64"),
                                                          ("int8", "8"), ("bf16", "64"))}) == 4
    # glove mode runs no MLM: the precision does not matter
    assert distinct["glove", "fp32", "64"] == distinct["glove", "int8", "64"]
    # Augment's key follows its candidates
    assert fingerprints["tinybert", "int8", "64"][1] != fingerprints["tinybert", "fp32", "64"][1]


# --- the MLM precision --------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_mlm(tiny_mlm_dir):
    from transformers import AutoTokenizer, BertForMaskedLM

    return BertForMaskedLM.from_pretrained(tiny_mlm_dir).eval(), AutoTokenizer.from_pretrained(tiny_mlm_dir)


def mlm_queries(tokenizer, sentences):
    from pipeline.augment.mlm_candidates import MaskQuery

    queries = []
    for sentence in sentences:
        ids = tuple(tokenizer(sentence, add_special_tokens=False)["input_ids"])
        queries += [MaskQuery(ids, i, i + 1) for i in range(len(ids))]
    return queries


def test_int8_quantises_the_encoder_and_keeps_the_head_fp32(tiny_mlm):
    import torch

    from pipeline.augment.mlm_candidates import MaskedLMCandidates, candidate_agreement

    model, tokenizer = tiny_mlm
    queries = mlm_queries(tokenizer, SENTENCES[:4])
    fp32 = MaskedLMCandidates(model, tokenizer, top_m=15, batch_size=16).candidates(queries)
    int8 = MaskedLMCandidates(model, tokenizer, top_m=15, batch_size=16, precision="int8")
    encoder, head = int8._split
    kinds = {type(m) for m in encoder.modules()}
    assert torch.ao.nn.quantized.dynamic.Linear in kinds and torch.nn.Linear not in kinds
    assert type(head.predictions.decoder) is torch.nn.Linear          # the head stays fp32
    assert type(model.bert.encoder.layer[0].attention.self.query) is torch.nn.Linear  # a copy
    found = int8.candidates(queries)
    assert len(found) == len(queries) and all(0 < len(c) <= 15 for c in found)
    agreement = candidate_agreement(fp32, found)
    assert agreement["positions"] == len(queries)
    assert 0 < agreement["same_order"] <= agreement["same_set"] <= 1
    assert candidate_agreement(fp32, fp32) == {"positions": len(queries), "same_set": 1.0,
                                               "same_order": 1.0}


def test_bf16_autocast_runs_and_devices_refuse_what_they_cannot_do(tiny_mlm):
    from pipeline.augment.mlm_candidates import (MaskedLMCandidates, candidate_agreement,
                                                 check_precision, cpu_has_native_bf16)

    model, tokenizer = tiny_mlm
    queries = mlm_queries(tokenizer, SENTENCES[:2])
    fp32 = MaskedLMCandidates(model, tokenizer, top_m=10).candidates(queries)
    bf16 = MaskedLMCandidates(model, tokenizer, top_m=10, precision="bf16",
                              allow_emulated_bf16=True).candidates(queries)
    assert candidate_agreement(fp32, bf16)["same_set"] > 0
    if not cpu_has_native_bf16():
        with pytest.raises(InputError, match="no native bf16"):
            MaskedLMCandidates(model, tokenizer, precision="bf16")
    with pytest.raises(InputError, match="fp16 is CUDA autocast"):
        MaskedLMCandidates(model, tokenizer, precision="fp16")
    with pytest.raises(InputError, match="int8 .* CPU only"):
        check_precision("int8", "cuda")
    with pytest.raises(InputError, match="unknown mlm_precision"):
        check_precision("int4", "cpu")


def test_teacher_cache_accepts_only_sampling_overrides_of_augmented_data():
    from tasks.augment import Augment
    from tasks.teacher import TeacherCache

    cache = TeacherCache(augment={"num_aug": 5, "aug_seed": 3})
    examples = cache.upstream_requirements()["examples"]
    assert isinstance(examples, Augment) and (examples.num_aug, examples.aug_seed) == (5, 3)
    assert examples.task_id != TeacherCache().upstream_requirements()["examples"].task_id
    assert "augment" not in cache.cache_stage_params()   # the Augment fingerprint says it
    with pytest.raises(InputError, match=r"unknown key\(s\) \['mode'\]"):
        TeacherCache(augment={"mode": "glove"}).upstream_requirements()
    with pytest.raises(InputError, match="does not read augmented data"):
        TeacherCache(examples="train", augment={"num_aug": 5}).upstream_requirements()


def test_a_precision_the_device_cannot_run_fails_before_anything_is_written(tmp_path, glove_dir,
                                                                         tiny_mlm_dir):
    resources = AugmentResources(vectors_dir=glove_dir, mlm_model=str(tiny_mlm_dir), device="cpu",
                                 mlm_precision="fp16")
    with pytest.raises(InputError, match="fp16 is CUDA autocast"):
        candidates_split(split_table(SENTENCES), tmp_path / "out", AugmentConfig(), resources,
                         progress=False)
    assert not (tmp_path / "out").exists()
