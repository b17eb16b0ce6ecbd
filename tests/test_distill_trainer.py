"""The trainer loop on tiny real models: parity of stored vs live teacher, resume, NaN, export."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distill.data import TokenizedExamples, collate, tokenize_rows
from distill.student import StudentSpec, build_student, export_student
from distill.trainer import NonFiniteLoss, OnlineTeacher, CachedTeacher, Trainer, recipe
from pipeline.cache.layer_map import cached_layers, layer_map
from pipeline.common.encoder_outputs import forward_internals

WORDS = "good bad movie plot actor great boring fun story scene long short film music".split()


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared machine the threads'
    barriers stall each other; one thread keeps these tests fast and steady."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_rows(n: int, seed: int = 0) -> list[dict]:
    import random
    rng = random.Random(seed)
    return [{"id": f"train-{i}", "text_a": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))),
             "text_b": None, "label": i % 2} for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope="module")
def teacher(tokenizer):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=48, num_hidden_layers=4,
                        num_attention_heads=4, intermediate_size=96, max_position_embeddings=64,
                        num_labels=2)
    return BertForSequenceClassification(config).eval()


@pytest.fixture(scope="module")
def examples(tokenizer):
    return tokenize_rows(tokenizer, make_rows(48), max_length=32)


class StoredTeacherSource:
    """Teacher outputs computed one example at a time and stored unpadded (as the cache does),
    re-padded with zeros per batch: what the cache reader yields, without Parquet."""

    def __init__(self, teacher, examples, hidden_layers, attention_layers):
        self.inner = TokenizedExamples(examples, "classification")
        self.stored = {}
        for example in examples:
            batch = collate([example], "classification")
            with torch.no_grad():
                out = forward_internals(teacher, batch["input_ids"], batch["token_type_ids"],
                                        batch["attention_mask"], hidden_layers, attention_layers)
            self.stored[example["id"]] = out

    @property
    def num_examples(self):
        return self.inner.num_examples

    def batches(self, batch_size, seed=None, epoch=0, start_batch=0):
        for batch in self.inner.batches(batch_size, seed, epoch, start_batch):
            size, length = batch["input_ids"].shape
            rows = [self.stored[i] for i in batch["ids"]]
            batch["teacher_logits"] = torch.cat([r.logits for r in rows])
            batch["teacher_hidden"], batch["teacher_scores"] = {}, {}
            for layer, first in rows[0].hidden.items():
                padded = first.new_zeros(size, length, first.shape[-1])
                for b, r in enumerate(rows):
                    padded[b, :r.hidden[layer].shape[1]] = r.hidden[layer][0]
                batch["teacher_hidden"][layer] = padded
            for layer, first in rows[0].scores.items():
                padded = first.new_zeros(size, first.shape[1], length, length)
                for b, r in enumerate(rows):
                    n = r.scores[layer].shape[-1]
                    padded[b, :, :n, :n] = r.scores[layer][0]
                batch["teacher_scores"][layer] = padded
            yield batch


def make_student(teacher, seed=7):
    spec = StudentSpec(num_layers=2, hidden_size=32, intermediate_size=64, num_heads=4, seed=seed)
    return build_student(spec, teacher.config, num_labels=2)


def run(tmp_path, name, teacher, source, provider, config, **kwargs):
    mapped = layer_map(teacher.config.num_hidden_layers, 2)
    trainer = Trainer(config, make_student(teacher), source, provider, tmp_path / name,
                      list(zip((1, 2), mapped)), teacher.config.hidden_size, **kwargs)
    return trainer, trainer.train()


def checkpoint_meta(path: Path) -> dict:
    """The counters of a checkpoint, read as data (weights_only)."""
    return json.loads(torch.load(path, weights_only=True)["meta"])


def loss_log(path: Path) -> list[dict]:
    keep = ("step", "embedding", "hidden", "attention", "prediction", "total", "lr")
    return [{k: v for k, v in json.loads(line).items() if k in keep}
            for line in path.read_text().splitlines() if "eval" not in json.loads(line)]


@pytest.mark.parametrize("stage", ["intermediate", "prediction"])
def test_stored_teacher_matches_online_teacher(tmp_path, teacher, examples, stage):
    hidden, attention = cached_layers(layer_map(4, 2))
    config = recipe(stage, batch_size=8, epochs=2, log_every=1, device="cpu", eval_every=0)
    stored = StoredTeacherSource(teacher, examples, hidden, attention)
    _, cached = run(tmp_path, "cached", teacher, stored, CachedTeacher(), config)
    _, online = run(tmp_path, "online", teacher, TokenizedExamples(examples, "classification"),
                    OnlineTeacher(teacher, hidden, attention), config)
    assert cached.steps == online.steps == 12
    for a, b in zip(cached.step_losses, online.step_losses):
        for name in ("embedding", "hidden", "attention", "prediction", "total"):
            if name in a:
                assert a[name] == pytest.approx(b[name], rel=1e-6, abs=1e-9), (a["step"], name)
    if stage == "intermediate":   # training really moves the student (a random teacher's
        # soft targets are near uniform, so the prediction loss has nowhere to fall)
        assert online.step_losses[-1]["total"] < online.step_losses[0]["total"]


class Interrupt(RuntimeError):
    pass


class FailingTeacher(OnlineTeacher):
    """Online teacher that raises on its n-th call (a crash in the middle of a step)."""

    def __init__(self, *args, fail_at: int, poison: bool = False):
        super().__init__(*args)
        self.calls, self.fail_at, self.poison = 0, fail_at, poison

    def __call__(self, batch):
        self.calls += 1
        out = super().__call__(batch)
        if self.calls == self.fail_at:
            if self.poison:
                out["teacher_hidden"][0] = out["teacher_hidden"][0] * float("nan")
            else:
                raise Interrupt(f"killed at call {self.calls}")
        return out


def test_resume_after_crash_equals_uninterrupted_run(tmp_path, teacher, examples):
    hidden, attention = cached_layers(layer_map(4, 2))
    source = TokenizedExamples(examples, "classification")
    # 48 examples / batch 10 = 5 batches per epoch (the last one short), 3 epochs = 15 steps;
    # checkpoints every 4 steps fall inside epochs, crashes after them lose some steps.
    config = recipe("intermediate", batch_size=10, epochs=3, log_every=1, checkpoint_every=4,
                    device="cpu", learning_rate=1e-3)
    reference, _ = run(tmp_path, "reference", teacher, source, OnlineTeacher(teacher, hidden, attention), config)

    out = tmp_path / "resumed"
    mapped = list(zip((1, 2), layer_map(4, 2)))
    for fail_at in (7, 6):   # crash in step 7 (checkpoint at 4), then again 6 calls into the rerun
        trainer = Trainer(config, make_student(teacher), source,
                          FailingTeacher(teacher, hidden, attention, fail_at=fail_at), out, mapped, 48)
        with pytest.raises(Interrupt):
            trainer.train()
    assert checkpoint_meta(out / "checkpoints" / "last.pt")["step"] == 8
    trainer = Trainer(config, make_student(teacher, seed=99), source,
                      OnlineTeacher(teacher, hidden, attention), out, mapped, 48)
    result = trainer.train()
    assert result.resumed_from == 8 and result.steps == 15

    assert loss_log(out / "metrics.jsonl") == loss_log(tmp_path / "reference" / "metrics.jsonl")
    for name, value in reference.student.state_dict().items():
        assert torch.equal(value, trainer.student.state_dict()[name]), name
    for name, value in reference.projections.state_dict().items():
        assert torch.equal(value, trainer.projections.state_dict()[name]), name


def test_nan_loss_stops_with_step_named_and_keeps_last_checkpoint(tmp_path, teacher, examples):
    hidden, attention = cached_layers(layer_map(4, 2))
    config = recipe("intermediate", batch_size=8, epochs=2, log_every=1, checkpoint_every=2, device="cpu")
    provider = FailingTeacher(teacher, hidden, attention, fail_at=5, poison=True)
    with pytest.raises(NonFiniteLoss, match=r"at step 5 .*\"embedding\": NaN.*last good checkpoint: step 4"):
        run(tmp_path, "nan", teacher, TokenizedExamples(examples, "classification"), provider, config)
    state = torch.load(tmp_path / "nan" / "checkpoints" / "last.pt", weights_only=True)
    assert json.loads(state["meta"])["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["student"].values() if v.is_floating_point())


def test_loss_checks_batched_to_log_steps_still_name_the_first_bad_step(tmp_path, teacher, examples):
    """The step reads its losses back only at log, evaluation and checkpoint steps (no host sync
    per step): a NaN at step 5 is found at the checkpoint of step 6, named as step 5, and that
    checkpoint is not written; with no log or checkpoint step at all, at the run's end."""
    hidden, attention = cached_layers(layer_map(4, 2))
    source = TokenizedExamples(examples, "classification")
    config = recipe("intermediate", batch_size=8, epochs=2, log_every=50, checkpoint_every=2, device="cpu")
    provider = FailingTeacher(teacher, hidden, attention, fail_at=5, poison=True)
    with pytest.raises(NonFiniteLoss, match=r"at step 5 \(epoch 0, batch 4, .*last good checkpoint: step 4"):
        run(tmp_path, "late", teacher, source, provider, config)
    assert checkpoint_meta(tmp_path / "late" / "checkpoints" / "last.pt")["step"] == 4
    config = recipe("intermediate", batch_size=8, epochs=2, log_every=0, checkpoint_every=0, device="cpu")
    provider = FailingTeacher(teacher, hidden, attention, fail_at=9, poison=True)
    with pytest.raises(NonFiniteLoss, match=r"at step 9 \(epoch 1, batch 2, .*no checkpoint written yet"):
        run(tmp_path, "end", teacher, source, provider, config)


def test_compile_gives_the_plain_steps_losses(tmp_path, teacher, examples):
    """compile = true (torch.compile of the student's forward and the losses, the score hooks
    installed once): the same per-step losses as the plain step, up to float noise. Dropout is
    off: a compiled graph draws its dropout masks from another generator."""
    hidden, attention = cached_layers(layer_map(4, 2))
    results = {}
    for compiled in (False, True):
        config = recipe("intermediate", batch_size=16, epochs=1, log_every=1, device="cpu", compile=compiled)
        student = make_student(teacher)
        for module in student.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        torch.manual_seed(3)   # the projections are drawn when the trainer is built
        trainer = Trainer(config, student, TokenizedExamples(examples, "classification"),
                          OnlineTeacher(teacher, hidden, attention), tmp_path / str(compiled),
                          list(zip((1, 2), layer_map(4, 2))), teacher.config.hidden_size)
        results[compiled] = trainer.train().step_losses
    assert len(results[True]) == len(results[False]) == 3
    for plain, compiled in zip(results[False], results[True]):
        for name in ("embedding", "hidden", "attention", "total"):
            assert compiled[name] == pytest.approx(plain[name], rel=1e-4), (plain["step"], name)


def test_prediction_stage_evaluates_and_keeps_the_best(tmp_path, teacher, examples, tokenizer):
    from distill.evaluate import Evaluator
    hidden, attention = cached_layers(layer_map(4, 2))
    dev = TokenizedExamples(examples[:16], "classification")
    evaluator = Evaluator(dev, task="SST-2", task_type="classification", batch_size=8,
                          device=torch.device("cpu"))
    bests = []
    config = recipe("prediction", batch_size=8, epochs=2, log_every=1, eval_every=3, device="cpu",
                    learning_rate=1e-3)
    trainer, result = run(tmp_path, "stage2", teacher, TokenizedExamples(examples, "classification"),
                          OnlineTeacher(teacher, hidden, attention), config, evaluate=evaluator,
                          on_best=lambda student, best: bests.append(best["step"]))
    evals = [json.loads(l) for l in (tmp_path / "stage2" / "metrics.jsonl").read_text().splitlines()
             if "eval" in json.loads(l)]
    assert [e["step"] for e in evals] == [3, 6, 9, 12]
    best = max(evals, key=lambda e: (e["eval"]["primary"], -e["step"]))
    assert result.best["step"] == best["step"] and bests[-1] == best["step"]
    assert result.best["metrics"]["accuracy"] == best["eval"]["accuracy"]


def test_export_works_with_transformers_pipeline(tmp_path, teacher, tokenizer):
    from transformers import pipeline
    student = build_student(StudentSpec(num_layers=2, hidden_size=32, intermediate_size=64, num_heads=4),
                            teacher.config, num_labels=2, label_names=["negative", "positive"])
    export_student(student, tokenizer, tmp_path / "student", {"task": "SST-2"})
    classify = pipeline("text-classification", model=str(tmp_path / "student"), device="cpu")
    got = classify(["a good movie", "boring plot"])
    assert {g["label"] for g in got} <= {"negative", "positive"}
    encoded = tokenizer(["a good movie"], return_tensors="pt")
    with torch.no_grad():
        probs = student.eval()(**encoded).logits.softmax(-1)[0]
    assert got[0]["score"] == pytest.approx(float(probs.max()), rel=1e-5)


def test_attention_heads_mismatch_is_a_clear_error(teacher):
    from pipeline.errors import InputError
    with pytest.raises(InputError, match="attention heads"):
        build_student(StudentSpec(num_layers=2, hidden_size=36, intermediate_size=64, num_heads=6),
                      teacher.config, num_labels=2)


KILL_SCRIPT = r'''
import os, signal, sys
from pathlib import Path
import torch
sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
from test_distill_trainer import make_rows, make_student
from distill.data import TokenizedExamples, tokenize_rows
from distill.trainer import OnlineTeacher, Trainer, recipe
from pipeline.cache.layer_map import cached_layers, layer_map
from transformers import AutoTokenizer, BertForSequenceClassification

class KillingTeacher(OnlineTeacher):
    calls = 0
    def __call__(self, batch):
        self.calls += 1
        if self.calls == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)   # no cleanup, no finally: a real kill
        return super().__call__(batch)

torch.set_num_threads(1)   # as the test process (reduction order)
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
teacher = BertForSequenceClassification.from_pretrained(sys.argv[2]).eval()
examples = tokenize_rows(tokenizer, make_rows(48), max_length=32)
hidden, attention = cached_layers(layer_map(4, 2))
config = recipe("intermediate", batch_size=10, epochs=3, log_every=1, checkpoint_every=4,
                device="cpu", learning_rate=1e-3)
Trainer(config, make_student(teacher), TokenizedExamples(examples, "classification"),
        KillingTeacher(teacher, hidden, attention), Path(sys.argv[4]), list(zip((1, 2), layer_map(4, 2))),
        teacher.config.hidden_size).train()
'''


def test_sigkilled_run_resumes_to_the_same_result(tmp_path, teacher, examples, minilm_dir):
    """A process killed with SIGKILL mid-step (a checkpoint at step 8, killed in step 11)."""
    import signal
    import subprocess
    import sys

    teacher.save_pretrained(tmp_path / "teacher")
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    out = tmp_path / "killed"
    done = subprocess.run([sys.executable, str(script), str(minilm_dir), str(tmp_path / "teacher"), "11",
                           str(out)], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert checkpoint_meta(out / "checkpoints" / "last.pt")["step"] == 8

    hidden, attention = cached_layers(layer_map(4, 2))
    source = TokenizedExamples(examples, "classification")
    config = recipe("intermediate", batch_size=10, epochs=3, log_every=1, checkpoint_every=4,
                    device="cpu", learning_rate=1e-3)
    reference, _ = run(tmp_path, "reference", teacher, source, OnlineTeacher(teacher, hidden, attention), config)
    resumed = Trainer(config, make_student(teacher), source, OnlineTeacher(teacher, hidden, attention), out,
                      list(zip((1, 2), layer_map(4, 2))), teacher.config.hidden_size)
    assert resumed.train().resumed_from == 8
    assert loss_log(out / "metrics.jsonl") == loss_log(tmp_path / "reference" / "metrics.jsonl")
    for name, value in reference.student.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[name]), name


def test_regression_task_learns_the_teachers_prediction(tmp_path, tokenizer):
    from transformers import BertConfig, BertForSequenceClassification

    from distill.evaluate import Evaluator
    torch.manual_seed(5)
    regressor = BertForSequenceClassification(BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=48, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=96, max_position_embeddings=64, num_labels=1, problem_type="regression")).eval()
    rows = [{**r, "label": float(i % 5)} for i, r in enumerate(make_rows(32, seed=3))]
    source = TokenizedExamples(tokenize_rows(tokenizer, rows, 32), "regression")
    student = build_student(StudentSpec(num_layers=2, hidden_size=32, intermediate_size=64, num_heads=4),
                            regressor.config, num_labels=1, task_type="regression")
    assert student.config.problem_type == "regression"
    evaluator = Evaluator(source, "STS-B", "regression", device=torch.device("cpu"))
    config = recipe("prediction", batch_size=8, epochs=3, log_every=1, device="cpu", learning_rate=1e-3,
                    eval_every=0)
    trainer = Trainer(config, student, source, OnlineTeacher(regressor, [], []), tmp_path / "reg",
                      [], 48, task_type="regression", evaluate=evaluator)
    result = trainer.train()
    losses = [s["prediction"] for s in result.step_losses]
    # MSE to the teacher's outputs (near 0), not to the labels 0..4 (which would be ~ 6)
    assert losses[-1] < losses[0] and max(losses) < 1.0
    assert set(result.final_eval) >= {"pearson", "spearman", "corr"}


def test_student_from_teacher_layers_copies_them(tmp_path, teacher):
    teacher.save_pretrained(tmp_path / "teacher")
    student = build_student(StudentSpec(init="teacher_layers", checkpoint=str(tmp_path / "teacher"),
                                        teacher_layers=[2, 4]), teacher.config, num_labels=2)
    assert student.config.num_hidden_layers == 2
    t_layers, s_layers = teacher.bert.encoder.layer, student.bert.encoder.layer
    for s_index, t_index in ((0, 1), (1, 3)):
        for name, value in s_layers[s_index].state_dict().items():
            assert torch.equal(value, t_layers[t_index].state_dict()[name]), name
    assert torch.equal(student.bert.embeddings.word_embeddings.weight,
                       teacher.bert.embeddings.word_embeddings.weight)


class PlantedPickle:
    """Unpickling this runs code: it creates the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_pickle_checkpoint_is_not_run_but_discarded(tmp_path, teacher, examples):
    hidden, attention = cached_layers(layer_map(4, 2))
    source = TokenizedExamples(examples, "classification")
    config = recipe("intermediate", batch_size=10, epochs=1, log_every=1, checkpoint_every=2,
                    device="cpu", learning_rate=1e-3)
    reference, _ = run(tmp_path, "reference", teacher, source, OnlineTeacher(teacher, hidden, attention), config)
    out = tmp_path / "planted"
    (out / "checkpoints").mkdir(parents=True)
    marker = tmp_path / "pwned"
    torch.save({"step": 2, "payload": PlantedPickle(marker)}, out / "checkpoints" / "last.pt")
    with pytest.warns(RuntimeWarning, match=r"planted/checkpoints/last\.pt: unreadable checkpoint discarded"):
        _, result = run(tmp_path, "planted", teacher, source, OnlineTeacher(teacher, hidden, attention), config)
    assert not marker.exists()              # the pickle's code never ran
    assert result.resumed_from is None and result.steps == 5
    assert loss_log(out / "metrics.jsonl") == loss_log(tmp_path / "reference" / "metrics.jsonl")


def test_a_corrupt_checkpoint_is_discarded_with_a_warning_naming_it(tmp_path, teacher, examples):
    hidden, attention = cached_layers(layer_map(4, 2))
    source = TokenizedExamples(examples, "classification")
    config = recipe("intermediate", batch_size=10, epochs=1, log_every=1, checkpoint_every=2,
                    device="cpu", learning_rate=1e-3)
    out = tmp_path / "corrupt"
    trainer = Trainer(config, make_student(teacher), source,
                      FailingTeacher(teacher, hidden, attention, fail_at=4), out,
                      list(zip((1, 2), layer_map(4, 2))), 48)
    with pytest.raises(Interrupt):
        trainer.train()
    checkpoint = out / "checkpoints" / "last.pt"
    data = bytearray(checkpoint.read_bytes())
    checkpoint.write_bytes(bytes(data[: len(data) // 2]))       # truncated by a crash or a full disk
    with pytest.warns(RuntimeWarning, match="corrupt/checkpoints/last.pt: unreadable checkpoint"):
        _, result = run(tmp_path, "corrupt", teacher, source, OnlineTeacher(teacher, hidden, attention), config)
    assert result.resumed_from is None and result.steps == 5


def test_train_seconds_accumulate_across_a_resume(tmp_path, teacher, examples):
    hidden, attention = cached_layers(layer_map(4, 2))
    source = TokenizedExamples(examples, "classification")
    config = recipe("intermediate", batch_size=10, epochs=3, log_every=1, checkpoint_every=4,
                    device="cpu", learning_rate=1e-3)
    out = tmp_path / "resumed"
    mapped = list(zip((1, 2), layer_map(4, 2)))
    trainer = Trainer(config, make_student(teacher), source,
                      FailingTeacher(teacher, hidden, attention, fail_at=10), out, mapped, 48)
    with pytest.raises(Interrupt):
        trainer.train()
    before = checkpoint_meta(out / "checkpoints" / "last.pt")
    assert before["step"] == 8 and before["train_seconds"] > 0
    trainer = Trainer(config, make_student(teacher), source, OnlineTeacher(teacher, hidden, attention),
                      out, mapped, 48)
    started = __import__("time").perf_counter()
    result = trainer.train()
    this_session = __import__("time").perf_counter() - started
    assert result.resumed_from == 8
    assert result.seconds >= before["train_seconds"] + 0.5 * this_session
    assert result.seconds > this_session


DISK_FULL_SCRIPT = """
import resource, signal, sys
from pathlib import Path
import torch
from distill.trainer import _atomic_torch_save
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)          # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))
target = Path(sys.argv[1]) / "last.pt"
try:
    _atomic_torch_save({"w": torch.zeros(1_000_000)}, target)
except OSError as exc:
    print("OSError:", exc)
"""


def test_a_full_disk_names_the_checkpoint_and_leaves_no_temporary_file(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "full.py"
    script.write_text(DISK_FULL_SCRIPT)
    (tmp_path / "ckpt").mkdir()
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt")],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"OSError: {tmp_path / 'ckpt' / 'last.pt'}: writing the checkpoint failed" in done.stdout
    assert list((tmp_path / "ckpt").iterdir()) == []        # no .last.pt.<pid>.tmp left behind
