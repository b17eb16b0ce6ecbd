"""The augmentation stages (Candidates, then Augment): determinism, resuming, bad input, the MLM
guard and the Luigi wiring."""
from __future__ import annotations

import contextlib

import luigi
import pyarrow as pa
import pytest

from pipeline.augment.augmenter import (AugmentConfig, AugmentResources, Augmenter, build_augmenter,
                                        default_num_aug, read_augmented)
from pipeline.augment.candidates import candidates_split
from pipeline.augment.sampling import augment_split
from pipeline.errors import InputError
from pipeline.stage import load_manifest
from pipeline.augment.word_vectors import convert_source

SENTENCES = [
    "it 's a charming and often affecting journey .",
    "unflinchingly bleak and desperate",
    "the acting , costumes , music , cinematography and sound are all astounding given the "
    "production 's austere locales .",
    "a gorgeous , witty , seductive movie .",
    "the story is also as unoriginal as they come , already having been recycled more times "
    "than i 'd care to count .",
    "Handsomely photographed, the picture is overlong; still, its melancholy lingers.",
    "This is a film well worth seeing , talking and singing heads and all .",
    "what really surprises about wisegirls is its low-key quality and genuine tenderness .",
]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def glove_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("glove")
    convert_source("packaged", out)
    return out


def two_stage(table, out, config, resources, *, examples_per_shard=2000, augmenter=None):
    """Candidates into ``out/candidates``, then sampling into ``out`` (the augmented shards);
    returns the two results."""
    found = candidates_split(table, out / "candidates", config, resources,
                             examples_per_shard=examples_per_shard, progress=False,
                             augmenter=augmenter)
    return found, augment_split(table, out / "candidates", out, config, progress=False)


def split_table(texts, pairs=False):
    text_b = [t[::-1].split(" ", 1)[-1][::-1] if pairs else None for t in texts]
    return pa.table({"id": [f"train-{i}" for i in range(len(texts))], "text_a": texts,
                     "text_b": pa.array(text_b, pa.string()),
                     "label": pa.array([i % 2 for i in range(len(texts))], pa.int64())})


def test_output_does_not_depend_on_shard_count_or_batch_size(tmp_path, glove_dir, tiny_mlm_dir):
    table = split_table(SENTENCES * 3)
    config = AugmentConfig(mode="tinybert", n_attempts=12, seed=3)
    outputs = []
    for per_shard, batch in ((1000, 64), (5, 3), (2, 1)):
        resources = AugmentResources(vectors_dir=glove_dir, mlm_model=str(tiny_mlm_dir),
                                     batch_size=batch)
        _, result = two_stage(table, tmp_path / f"out-{per_shard}", config, resources,
                              examples_per_shard=per_shard)
        outputs.append((read_augmented(tmp_path / f"out-{per_shard}"), result))
    first, result = outputs[0]
    for table_k, result_k in outputs[1:]:
        assert table_k.equals(first)
        assert result_k["counts"] == result["counts"]
    assert result["counts"]["positions_mlm"] > 0 and result["counts"]["positions_glove"] > 0
    assert first.column("aug_index").to_pylist()[0] == 0
    assert first.schema.field("aug_index").type == pa.int32()
    # a different seed gives different variants, the same originals
    _, other = two_stage(table, tmp_path / "seed4", AugmentConfig(mode="tinybert", n_attempts=12,
                         seed=4), AugmentResources(vectors_dir=glove_dir, mlm_model=str(tiny_mlm_dir)))
    assert other["counts"]["examples_in"] == result["counts"]["examples_in"]
    assert not read_augmented(tmp_path / "seed4").equals(first)


def test_killed_runs_resume_from_finished_shards(tmp_path, glove_dir, monkeypatch):
    import pipeline.augment.sampling as sampling

    # Repeated sentences: the resumed run meets words the killed run counted already.
    table = split_table(SENTENCES * 2, pairs=True)
    config = AugmentConfig(mode="glove", n_attempts=10)
    resources = AugmentResources(vectors_dir=glove_dir)
    whole_candidates, whole = two_stage(table, tmp_path / "whole", config, resources,
                                        examples_per_shard=3)

    class DiesOnSecondShard(Augmenter):
        calls = 0

        def side_candidates(self, examples):
            DiesOnSecondShard.calls += 1
            if DiesOnSecondShard.calls == 2:
                raise KeyboardInterrupt("killed")
            return super().side_candidates(examples)

    dying = build_augmenter(config, resources)
    dying.__class__ = DiesOnSecondShard
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        candidates_split(table, out / "candidates", config, resources, examples_per_shard=3,
                         progress=False, augmenter=dying)
    assert sorted(p.name for p in (out / "candidates" / "shards").iterdir()) == ["part-00000.parquet"]
    found = candidates_split(table, out / "candidates", config, resources, examples_per_shard=3,
                             progress=False)
    assert found["shards_resumed"] == 1 and found["shards"] == 6
    assert found["counts"] == whole_candidates["counts"]   # glove_distinct_words included

    calls = []
    real_sample = sampling.sample_examples

    def dies_on_second_shard(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real_sample(*args)

    monkeypatch.setattr(sampling, "sample_examples", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        augment_split(table, out / "candidates", out, config, progress=False)
    monkeypatch.setattr(sampling, "sample_examples", real_sample)
    resumed = augment_split(table, out / "candidates", out, config, progress=False)
    assert resumed["shards_resumed"] == 1 and resumed["shards"] == 6
    assert resumed["counts"] == whole["counts"]
    for name in sorted(p.name for p in (tmp_path / "whole" / "shards").iterdir()):
        for stage in ("candidates/shards", "shards"):
            assert (out / stage / name).read_bytes() == (tmp_path / "whole" / stage / name).read_bytes()


def test_bad_input_is_counted_never_a_crash(tmp_path, glove_dir, tiny_mlm_dir):
    texts = ["", "   ", "the of and to it", "... !!! , ;", "Über naïve café crème brûlée 東京 😀",
             "zyzzyvaqq flurbbish grommetxx", "a normal sentence about movies ."]
    table = split_table(texts)
    _, result = two_stage(table, tmp_path / "out", AugmentConfig(mode="tinybert", n_attempts=8),
                          AugmentResources(vectors_dir=glove_dir, mlm_model=str(tiny_mlm_dir)))
    counts = result["counts"]
    assert counts["examples_in"] == len(texts)
    assert counts["empty_sentences"] == 2
    assert counts["sentences_without_positions"] == 2      # stop words only, punctuation only
    assert counts["non_ascii_words"] >= 3                  # 東, 京, 😀 (accents are stripped)
    assert counts["positions_glove_word_absent"] >= 2      # invented multi-piece words
    assert counts["positions_without_candidates_glove"] == counts["positions_glove_word_absent"]
    out = read_augmented(tmp_path / "out")
    originals = [r for r in out.to_pylist() if r["aug_index"] == 0]
    assert [r["text_a"] for r in originals] == texts        # every original kept, unchanged
    for row in out.to_pylist():
        if row["orig_id"] in ("train-0", "train-1", "train-2", "train-3"):
            assert row["aug_index"] == 0                   # nothing to replace: no variants


def test_sentence_pair_sides_are_augmented_separately(tmp_path, glove_dir):
    table = pa.table({"id": ["p-0"], "text_a": ["The committee approved the ambitious budget."],
                      "text_b": ["Lawmakers rejected the controversial proposal."],
                      "label": pa.array([1.5])})
    two_stage(table, tmp_path / "out", AugmentConfig(mode="glove", n_attempts=15),
              AugmentResources(vectors_dir=glove_dir))
    rows = read_augmented(tmp_path / "out").to_pylist()
    a0, b0 = table["text_a"][0].as_py(), table["text_b"][0].as_py()
    side_a = [r for r in rows[1:] if r["text_b"] == b0]
    side_b = [r for r in rows[1:] if r["text_a"] == a0]
    assert side_a and side_b and len(side_a) + len(side_b) == len(rows) - 1
    assert rows[0]["text_a"] == a0 and rows[0]["text_b"] == b0
    assert [r["aug_index"] for r in rows] == list(range(len(rows)))
    assert {r["label"] for r in rows} == {1.5}            # regression labels pass through


def test_checkpoint_without_trained_mlm_head_is_refused(minilm_dir):
    from pipeline.augment.mlm_candidates import load_masked_lm

    with pytest.raises(InputError, match=r"no trained masked-LM head.*cls\.predictions"):
        load_masked_lm(str(minilm_dir))


def test_per_task_default_n():
    assert default_num_aug("SST-2") == 20 and default_num_aug("mrpc") == 30
    assert default_num_aug("MNLI") == 10 and default_num_aug("my-task") == 20
    with pytest.raises(InputError):
        AugmentConfig(mode="bert")


# --- the Luigi stages ----------------------------------------------------------------------

def write_sst2(root, sentences):
    task_dir = root / "SST-2"
    task_dir.mkdir(parents=True)
    for split, rows in (("train", sentences), ("dev", sentences[:2])):
        lines = ["sentence\tlabel"] + [f"{s}\t{i % 2}" for i, s in enumerate(rows)]
        (task_dir / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def run_luigi(*tasks):
    return luigi.build(list(tasks), local_scheduler=True, detailed_summary=True,
                       log_level="WARNING")


@contextlib.contextmanager
def configured(task_name, *argv):
    """Build ``task_name`` with command-line flags, as ``tinykd run`` does (upstream tasks are
    configured by ``--PrepareData-...`` / ``--WordVectors-...`` flags)."""
    from luigi.cmdline_parser import CmdlineParser

    import tasks.augment  # noqa: F401  (registers the tasks)

    with CmdlineParser.global_instance([task_name, *argv]) as parser:
        yield parser.get_task_obj()


@pytest.mark.slow
def test_luigi_augment_with_packaged_glove_and_a_local_mlm(tmp_path, tiny_mlm_dir):
    from tasks.augment import WordVectors

    glue = write_sst2(tmp_path / "glue", [s.replace("\t", " ") for s in SENTENCES])
    data = ["--PrepareData-source", "glue", "--PrepareData-glue-dir", str(glue),
            "--PrepareData-task", "SST-2"]
    with configured("Augment", "--mode", "tinybert", "--mlm-model", str(tiny_mlm_dir),
                    "--examples-per-shard", "3", "--aug-progress", "false", *data) as task:
        result = run_luigi(task)
        assert result.status.name == "SUCCESS", result.summary_text
        vectors = load_manifest(WordVectors().output_dir())
        candidates_task = task.requires()["candidates"]
        assert candidates_task.requires()["vectors"].output_dir() == WordVectors().output_dir()
        assert run_luigi(task).status.name == "SUCCESS"      # a no-op rerun
    manifest = load_manifest(task.output_dir())
    candidates = load_manifest(candidates_task.output_dir())
    counts = manifest["info"]["counts"]
    assert manifest["info"]["n_attempts"] == 20            # SST-2's reference N
    assert counts["examples_in"] == len(SENTENCES)
    assert manifest["rows"]["examples_out"] == read_augmented(task.output_dir()).num_rows
    assert counts["positions_mlm"] > 0 and counts["positions_glove"] > 0
    assert {k: v for k, v in counts.items() if not k.startswith("examples_")} == candidates["info"]["counts"]
    assert len(list((task.output_dir() / "shards").glob("part-*.parquet"))) == 3
    assert len(list((candidates_task.output_dir() / "shards").glob("part-*.parquet"))) == 3
    assert vectors["info"]["vocab_size"] == 400_000 and vectors["info"]["dim"] == 50
    assert candidates["params"]["mlm_model"] == "<local directory, hashed>"
    assert candidates["params"]["mlm_precision"] == "fp32" and "aug_batch_size" not in candidates["params"]
    assert set(manifest["params"]) == {"num_aug", "aug_p", "aug_seed"}
    assert set(manifest["upstream"]) == {"data", "candidates"}
    with configured("Augment", "--mode", "glove", "--aug-progress", "false", *data) as glove_task:
        assert run_luigi(glove_task).status.name == "SUCCESS"
        glove_candidates = glove_task.requires()["candidates"]
    glove_manifest = load_manifest(glove_candidates.output_dir())
    assert "mlm_model" not in glove_manifest["params"] and "mlm_precision" not in glove_manifest["params"]
    assert glove_manifest["upstream"]["vectors"] == candidates["upstream"]["vectors"]


@pytest.mark.slow
def test_luigi_glove_trained_on_sst2_is_a_working_source(shared_glue):
    from tasks.augment import WordVectors

    data = ["--PrepareData-source", "glue", "--PrepareData-glue-dir", str(shared_glue),
            "--PrepareData-task", "SST-2", "--PrepareData-max-train-examples", "3000"]
    training = ["--WordVectors-vectors-source", "trained", "--WordVectors-glove-epochs", "5",
                "--WordVectors-glove-dimensions", "32", "--WordVectors-glove-min-count", "2"]
    with configured("Augment", "--mode", "glove", "--aug-progress", "false",
                    "--examples-per-shard", "1000", *data, *training) as task:
        result = run_luigi(task)
        assert result.status.name == "SUCCESS", result.summary_text
        trained = WordVectors()
        vectors = load_manifest(trained.output_dir())
    assert vectors["info"]["source"] == "glove-python" and vectors["info"]["dim"] == 32
    assert 2000 < vectors["info"]["vocab_size"] < 10000
    info = load_manifest(task.output_dir())["info"]
    counts = info["counts"]
    assert info["n_attempts"] == 20 and counts["examples_in"] == 3000
    assert counts["positions_glove"] > counts["positions_glove_word_absent"] > 0
    assert counts["examples_out"] > 5 * counts["examples_in"]
    # trained vectors depend on the data; the packaged ones do not
    with configured("WordVectors", *data[:-1], "2000", *training[2:]) as other:
        assert other.fingerprint() != trained.fingerprint()
    with configured("WordVectors", "--vectors-source", "packaged", *data) as packaged:
        packaged_a = packaged.fingerprint()
    with configured("WordVectors", "--vectors-source", "packaged", *data[:-1], "2000") as packaged:
        assert packaged.fingerprint() == packaged_a


def test_repeated_sentences_are_forwarded_once(tiny_mlm_dir):
    from transformers import AutoTokenizer, BertForMaskedLM

    from pipeline.augment.mlm_candidates import MaskedLMCandidates

    tokenizer = AutoTokenizer.from_pretrained(tiny_mlm_dir)
    mlm = MaskedLMCandidates(BertForMaskedLM.from_pretrained(tiny_mlm_dir).eval(), tokenizer)
    augmenter = Augmenter(AugmentConfig(mode="mlm"), mlm=mlm, tokenizer=tokenizer)
    examples = [{"id": str(i), "text_a": SENTENCES[i % 2], "text_b": None, "label": 0}
                for i in range(6)]
    candidates = augmenter.position_candidates(examples)
    assert candidates[0] == candidates[2] == candidates[4] != candidates[1]
    assert augmenter.counts["mlm_queries"] == 3 * mlm.forwards > 0


@pytest.mark.slow
def test_a_resumed_augment_records_what_a_fresh_one_records(tmp_path, isolated_workdir, monkeypatch):
    """Shards that share words, a run killed in its second shard and resumed: both stages'
    manifests equal a fresh run's but for the run-history fields (glove_distinct_words grew
    after a resume when it counted the lookups of one process)."""
    import shutil

    from pipeline.stage import manifest_content

    glue = write_sst2(tmp_path / "glue", [s.replace("\t", " ") for s in SENTENCES] * 3)
    argv = ["--mode", "glove", "--examples-per-shard", str(len(SENTENCES)), "--aug-progress", "false",
            "--PrepareData-source", "glue", "--PrepareData-glue-dir", str(glue),
            "--PrepareData-task", "SST-2"]
    with configured("Augment", *argv) as task:
        assert run_luigi(task).status.name == "SUCCESS"
        outputs = [task.requires()["candidates"].output_dir(), task.output_dir()]
        fresh = [load_manifest(d) for d in outputs]
        for directory in outputs:
            shutil.rmtree(directory)
        original = Augmenter.side_candidates
        calls = []

        def dies_in_the_second_shard(self, examples):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("killed")
            return original(self, examples)

        monkeypatch.setattr(Augmenter, "side_candidates", dies_in_the_second_shard)
        luigi.task_register.Register.clear_instance_cache()
        assert run_luigi(task).status.name == "FAILED"
        monkeypatch.setattr(Augmenter, "side_candidates", original)
        luigi.task_register.Register.clear_instance_cache()
        assert run_luigi(task).status.name == "SUCCESS"
        resumed = [load_manifest(d) for d in outputs]
    assert resumed[0]["info"]["shards_resumed"] == 1 and fresh[0]["info"]["shards_resumed"] == 0
    assert fresh[0]["info"]["counts"]["glove_distinct_words"] > 0
    assert [manifest_content(m) for m in resumed] == [manifest_content(m) for m in fresh]
