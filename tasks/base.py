"""Luigi wiring for the stage contract in :mod:`pipeline.stage`.

Every task of the DAG is a :class:`StageTask`: it declares a stage name and version, its
parameters (Luigi's ``significant=`` flag decides which ones enter the fingerprint), its
upstream tasks (``requires()``) and the local files it reads (``stage_inputs()``). From those
it derives a :class:`~pipeline.stage.StageKey`, hence ``output()`` =
``<workdir>/<stage>/<fingerprint>``, so Luigi's existence check *is* a staleness check.
``run()`` opens an atomic build and hands it to ``build()``, which calls plain functions in
``pipeline/`` or ``distill/``. Around ``build()`` it records the stage's peak and end memory in
the manifest's run history and gives the memory the build freed back to the system
(:mod:`pipeline.stage.memory`): Luigi runs a whole DAG's stages in one process.

This module must stay cheap to import: it is on the path of every no-op rerun, so it never
imports torch, transformers or datasets (stages import them inside ``build()``).
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, ClassVar

import luigi
from luigi.task import flatten

from pipeline.stage import (FileHasher, StageAlreadyComplete, StageBuild, StageKey, build_stage,
                            explain_key, fetch_output, measured_memory, store_output_rel,
                            verify_store_upstream, verify_upstream)

LOG = logging.getLogger("luigi-interface")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORKDIR = PROJECT_ROOT / "data" / "work"


class pipeline(luigi.Config):  # noqa: N801 - Luigi names config sections after the class
    """``[pipeline]`` section of luigi.cfg: settings shared by every stage."""

    workdir = luigi.Parameter(
        default="",
        significant=False,
        description="Root of all stage outputs (content-addressed): a local directory, or a URL "
                    "(s3://bucket/prefix, gs://…, file://…) that several machines share. Empty: "
                    "$TINYKD_WORKDIR, else data/work inside the project.",
    )
    scratch = luigi.Parameter(
        default="",
        significant=False,
        description="With a URL workdir: this machine's local directory where stages build "
                    "before uploading, and where upstream outputs needed as local files are "
                    "fetched once. Empty: $TINYKD_SCRATCH, else a directory under the system's "
                    "temporary directory named after the workdir URL. Unused with a local workdir.",
    )
    local_cache_gb = luigi.FloatParameter(
        default=0.0,
        significant=False,
        description="With a URL workdir: gigabytes of local disk under the scratch directory "
                    "for teacher-cache shards read from the store, so that the second epoch does "
                    "not download again (least recently used shards go first). 0: stream every "
                    "epoch from the store (ranged reads of the needed columns).",
    )
    devices = luigi.Parameter(
        default="auto",
        significant=False,
        description="The device pool of the compute stages (pipeline.common.devices): auto (every "
                    "visible CUDA device; without CUDA the CPU, not leased), cuda:0,cuda:1,... "
                    "(these GPUs), or cpu / cpu,cpu (one / two CPU slots). A stage with device = "
                    "auto leases the device(s) it runs on for as long as it runs, so --workers k "
                    "on k GPUs runs k stages on k devices; a stage that finds none free waits.",
    )
    partial_sync_seconds = luigi.FloatParameter(
        default=60.0,
        significant=False,
        description="With a URL workdir: how often a resumable stage copies its finished parts "
                    "(augmentation shards, checkpoints) to the store's partial prefix, so that "
                    "another machine can continue a killed build (0: only when the build fails).",
    )


def workdir_location() -> str:
    """The configured workdir as written: a local path or a URL."""
    configured = pipeline().workdir or os.environ.get("TINYKD_WORKDIR", "")
    return configured or str(DEFAULT_WORKDIR)


def workdir_store():
    """The :class:`pipeline.store.Store` of a URL workdir, or None for a local one."""
    from pipeline.store import is_url, open_store

    location = workdir_location()
    return open_store(location) if is_url(location) else None


def workdir() -> Path:
    """The local root of stage outputs: the workdir itself, or with a URL workdir this
    machine's scratch directory (its builds and its copies of fetched outputs)."""
    location = workdir_location()
    from pipeline.store import is_url

    if is_url(location):
        return scratch_dir()
    return Path(location).expanduser().resolve()


def scratch_dir() -> Path:
    """This machine's scratch directory (``[pipeline] scratch``; see its description)."""
    import hashlib
    import tempfile

    from pipeline.store import redact

    configured = pipeline().scratch or os.environ.get("TINYKD_SCRATCH", "")
    if configured:
        return Path(configured).expanduser().resolve()
    name = hashlib.sha256(redact(workdir_location()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"tinykd-scratch-{os.getuid()}" / name


class StoreTarget(luigi.Target):
    """A stage output on a store: it exists when its ``manifest.json`` object does and the files
    it lists are there with their sizes (:func:`pipeline.stage.store_output_complete`).

    Found complete once, it is not asked again in this process (Luigi asks a task several
    times per run; every question is a request to the store)."""

    _complete: ClassVar[set] = set()

    def __init__(self, store, rel: str, local_manifest: Path | None = None):
        self.store, self.rel, self.local_manifest = store, rel, local_manifest

    def exists(self) -> bool:
        from pipeline.stage import store_output_complete

        key = (id(self.store), self.rel)   # one Store per URL and endpoint (open_store)
        if key in StoreTarget._complete:
            return True
        done = store_output_complete(self.store, self.rel, self.local_manifest)
        if done:
            StoreTarget._complete.add(key)
        return done

    @property
    def path(self) -> str:
        return self.store.url_of(self.rel)


#: The one ``num_threads`` parameter of every compute stage (same name, same meaning).
NUM_THREADS_DESCRIPTION = ("CPU intra-op threads of torch while the stage runs (0: torch's default, "
                           "one per core). Set 1 (or a few) when other jobs share the cores: "
                           "oversubscribed threads wait on each other. Results do not depend on it "
                           "beyond floating-point noise.")


def num_threads_parameter() -> luigi.IntParameter:
    return luigi.IntParameter(default=0, significant=False, description=NUM_THREADS_DESCRIPTION)


_HASHERS: dict[Path, FileHasher] = {}


def shared_hasher(root: Path) -> FileHasher:
    """One hash cache per workdir and process, so a DAG walk reads it once."""
    if root not in _HASHERS:
        _HASHERS[root] = FileHasher(root / ".hash-cache.json")
    return _HASHERS[root]


# --- profiles: per-task configuration inside one Luigi run ---------------------------------
#
# Luigi resolves a parameter from the command line, then its configuration (one global
# parser), then the default. The GLUE harness runs nine tasks' DAGs in one run, each with its
# own profile (configs/glue/<task>.cfg), so a stage can carry ``profile``: the file layered over
# the global configuration while *its* parameters are resolved. Every stage passes its profile
# on to the upstream stages it makes (``self.upstream(...)``), so a whole DAG reads one profile.
# The profile itself is not identity: the parameter values it gives are (a DAG built with
# ``--config P`` and the same DAG with ``profile = P`` have the same fingerprints).

_PROFILE_PARSERS: dict[tuple, Any] = {}


def resolve_profile(profile: str) -> Path:
    """A profile path as given, else relative to the project root; an InputError if absent."""
    from pipeline.errors import InputError

    for candidate in (Path(profile).expanduser(), PROJECT_ROOT / profile):
        if candidate.is_file():
            return candidate.resolve()
    raise InputError("profile not found (a configuration file layered over luigi.cfg)", profile)


def profile_parser(profile: str):
    """The global configuration's files with ``profile`` read last (one parser per profile)."""
    from luigi.configuration import LuigiConfigParser

    path = str(resolve_profile(profile))
    key = (tuple(LuigiConfigParser._config_paths), path)
    if key not in _PROFILE_PARSERS:
        parser = LuigiConfigParser()
        parser.read(list(LuigiConfigParser._config_paths) + [path])
        _PROFILE_PARSERS[key] = parser
    return _PROFILE_PARSERS[key]


class StageTask(luigi.Task):
    """A Luigi task whose output directory is named by its content fingerprint."""

    profile = luigi.Parameter(
        default="", significant=True,
        description="A configuration file layered over luigi.cfg (and --config) while this stage's "
                    "parameters are resolved, passed on to its upstream stages: how the GLUE "
                    "harness gives each task its own profile in one run. Empty: none. Significant "
                    "for Luigi (two tasks' stages are two tasks), never in the fingerprint: the "
                    "values it gives are.")

    @classmethod
    def get_param_values(cls, params, args, kwargs):
        profile = kwargs.get("profile") or ""
        if not profile:
            return super().get_param_values(params, args, kwargs)
        from luigi.configuration import LuigiConfigParser

        saved = LuigiConfigParser._instance
        LuigiConfigParser._instance = profile_parser(profile)
        try:
            return super().get_param_values(params, args, kwargs)
        finally:
            LuigiConfigParser._instance = saved

    def __repr__(self) -> str:
        """Luigi's ``Family(param=value, ...)``, without ``profile=`` when no profile is set:
        the profile is a harness detail, and an empty first field made every log line longer."""
        if self.profile:
            return super().__repr__()
        shown = [(name, param) for name, param in self.get_params()
                 if param.significant and name != "profile"]
        return "{}({})".format(self.get_task_family(), ", ".join(
            f"{name}={param.serialize(self.param_kwargs[name])}" for name, param in shown))

    def upstream(self, cls, **kwargs):
        """An upstream stage of this DAG: ``cls(**kwargs)`` under this stage's profile."""
        return cls(profile=self.profile, **kwargs)

    #: Directory name of the stage under the workdir.
    stage_name: ClassVar[str]
    #: Bump when the code changes what this stage writes for the same inputs.
    stage_version: ClassVar[str] = "1"
    #: Keep the partial directory after a failure so a rerun can continue from it.
    resumable: ClassVar[bool] = False
    #: Whether readers of this stage re-hash its Parquet files before use (sizes are always
    #: checked). Off only for stages whose Parquet files are large and carry page CRCs that
    #: their reader verifies on every read (the teacher cache).
    hash_parquet_on_read: ClassVar[bool] = True
    #: Whether ``build()`` runs torch (then ``num_threads``, when declared, is applied to it).
    #: False for a stage that only passes ``num_threads`` on: it need not import torch at all.
    uses_torch: ClassVar[bool] = True
    #: With a URL workdir, downstream stages read this output straight from the store (the
    #: teacher cache: tens of GB, streamed by its reader) instead of a fetched local copy.
    stream_from_store: ClassVar[bool] = False
    #: Whether the stage computes on a device of ``[pipeline] devices`` (with ``device = auto``
    #: it leases one, or ``devices_wanted()``, while it builds).
    leases_devices: ClassVar[bool] = False
    #: The family of the tasks ``run()`` yields as dynamic dependencies when ``requires()`` could
    #: not list them yet ("" for none): the console's scheduling line says they come on top.
    dynamic_requirements: ClassVar[str] = ""
    #: The report files ``build()`` writes (``tinykd run`` / ``demo`` print their paths last).
    report_files: ClassVar[tuple[str, ...]] = ()
    #: The devices leased for the build in progress ([] when none is leased), and their slots.
    leased_devices: list[str] = []
    leased_slots: list[str] = []

    # --- declared by subclasses -------------------------------------------------------------
    def stage_inputs(self) -> dict[str, str | Path]:
        """Local files or directories this stage reads directly (hashed into the key)."""
        return {}

    def stage_params(self) -> dict[str, Any]:
        """Significant parameters, by Luigi's own ``significant=`` flag (the profile aside)."""
        return {name: self.param_kwargs[name]
                for name, param in self.get_params() if param.significant and name != "profile"}

    def build(self, out: StageBuild) -> None:
        raise NotImplementedError

    def preflight(self) -> None:
        """Check settings that need no upstream output before anything is built or written
        (bad ones raise :class:`~pipeline.errors.InputError`); a stage overrides it."""
        if self.leases_devices:
            self.device_pool()

    def devices_wanted(self, pool: list[str]) -> int:
        """How many devices of ``pool`` this stage leases (one; a multi-rank stage more)."""
        return 1

    # --- devices ------------------------------------------------------------------------------
    def device_pool(self) -> list[str]:
        """``[pipeline] devices`` parsed against this machine ([] : the unleased CPU)."""
        from pipeline.common.devices import parse_pool

        spec = pipeline().devices
        needs_cuda = spec.strip() in ("", "auto") or "cuda" in spec
        if needs_cuda:
            from pipeline.common.devices import cuda_device_count

            return parse_pool(spec, cuda_device_count())
        return parse_pool(spec, 0)

    def leases(self) -> bool:
        """Whether this build leases devices: a compute stage left at ``device = auto`` (an
        explicit device is the user's choice and is used as given, without a lease)."""
        return self.leases_devices and str(getattr(self, "device", "auto")) in ("", "auto")

    @contextlib.contextmanager
    def device_lease(self):
        """Hold this build's device lease (the leased device names; [] when none)."""
        if not self.leases():
            yield []
            return
        from pipeline.common.devices import DeviceLease

        pool = self.device_pool()

        def waiting(holders):
            LOG.info("%s: waiting for %d free device(s) of %s (held: %s)", self.task_id,
                     self.devices_wanted(pool), ",".join(pool),
                     ", ".join(f"{h['device']} by pid {h.get('pid')}" for h in holders) or "none")

        lease = DeviceLease(workdir(), pool, self.devices_wanted(pool), on_wait=waiting)
        devices = lease.acquire()
        self.leased_slots = lease.slots
        try:
            if devices:
                LOG.info("%s: leased %s (slots %s)", self.task_id, ",".join(devices), ",".join(lease.slots))
            yield devices
        finally:
            lease.release()

    def build_device(self) -> str:
        """The device ``build()`` computes on: the leased one, else the configured ``device``."""
        return self.leased_devices[0] if self.leased_devices else str(getattr(self, "device", "auto"))

    # --- derived ----------------------------------------------------------------------------
    def upstream_tasks(self) -> dict[str, "StageTask"]:
        """``requires()`` as a label -> task mapping (labels are the dict keys, or class names)."""
        required = self.requires()
        if isinstance(required, dict):
            items = required.items()
        else:
            tasks = flatten(required)
            items = ((t.task_id if sum(type(u) is type(t) for u in tasks) > 1
                      else type(t).__name__, t) for t in tasks)
        return {label: task for label, task in items if isinstance(task, StageTask)}

    def stage_key(self) -> StageKey:
        if getattr(self, "_stage_key", None) is None:
            self._stage_key = StageKey(
                stage=self.stage_name,
                version=self.stage_version,
                params=self.stage_params(),
                upstream={label: task.fingerprint() for label, task in self.upstream_tasks().items()},
                inputs=self.stage_inputs(),
            )
        return self._stage_key

    def fingerprint(self) -> str:
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = self.stage_key().fingerprint(shared_hasher(workdir()))
        return self._fingerprint

    def output_dir(self) -> Path:
        """The output's local directory: under the workdir, or with a URL workdir this machine's
        copy under the scratch directory (present once built here or fetched: readable_dir())."""
        return workdir() / self.stage_name / self.fingerprint()

    def store_rel(self) -> str:
        return store_output_rel(self.stage_name, self.fingerprint())

    def output(self):
        store = workdir_store()
        if store is not None:
            from pipeline.stage import MANIFEST_NAME

            return StoreTarget(store, self.store_rel(), self.output_dir() / MANIFEST_NAME)
        return luigi.LocalTarget(str(self.output_dir()))

    def output_location(self) -> str | Path:
        """Where the output is: its local directory, or its URL on the store."""
        store = workdir_store()
        return store.url_of(self.store_rel()) if store is not None else self.output_dir()

    def readable_dir(self) -> Path:
        """The output as local files: the output itself, or with a URL workdir the copy fetched
        once (checked against its manifest) into the scratch directory."""
        store = workdir_store()
        if store is None:
            return self.output_dir()
        return fetch_output(store, self.stage_name, self.fingerprint(), workdir())

    def manifest(self) -> dict:
        """This output's manifest (read from the store with a URL workdir; nothing else fetched)."""
        from pipeline.stage import load_manifest, load_store_manifest

        store = workdir_store()
        if store is None:
            return load_manifest(self.output_dir())
        return load_store_manifest(store, self.store_rel())

    def upstream_dir(self, label: str) -> Path | str:
        """An upstream output for ``build()`` to read: a local directory, or for a stage that is
        streamed from a store (``stream_from_store``), its URL."""
        task = self.upstream_tasks()[label]
        store = workdir_store()
        if store is not None and task.stream_from_store:
            return f"{store.url}/{task.store_rel()}"
        return task.readable_dir()

    def task_name(self) -> str | None:
        """The task (``PrepareData.task``) this output belongs to: its own ``task`` parameter,
        else its upstream's; None for task-independent stages (packaged word vectors, say)."""
        own = self.param_kwargs.get("task")
        if own:
            return str(own)
        for task in self.upstream_tasks().values():
            name = task.task_name()
            if name:
                return name
        return None

    def run(self) -> None:
        hasher = shared_hasher(workdir())
        self.preflight()   # bad settings fail here: nothing built, nothing written
        try:
            with build_stage(workdir(), self.stage_key(), resumable=self.resumable, hasher=hasher,
                             store=workdir_store(),
                             partial_sync_seconds=pipeline().partial_sync_seconds) as out, \
                    self.device_lease() as devices:
                self.leased_devices = devices
                if devices:   # run history (pipeline.stage.RUN_HISTORY_INFO_KEYS), not content
                    out.info["device_lease"] = {"devices": devices, "slots": self.leased_slots}
                self.verify_upstream()
                memory: dict[str, Any] = {}
                # peak and end RSS into the run history; freed memory back to the system after
                # the build, so the next stage of this process starts from what is still in use
                with measured_memory(memory):
                    if "num_threads" in self.param_kwargs and self.uses_torch:   # its thread count, for build()
                        from pipeline.common.device import torch_threads

                        with torch_threads(self.num_threads) as threads:
                            out.info["torch_threads"] = threads
                            self.build(out)
                    else:
                        self.build(out)
                out.info["memory"] = memory   # run history (pipeline.stage.RUN_HISTORY_INFO_KEYS)
                # recorded for `explain`, which compares a key with earlier outputs of its own task
                task = self.task_name()
                if task:
                    out.info.setdefault("task", task)
        except StageAlreadyComplete as done:
            # Another local process built it while this one waited for the build lock.
            LOG.info("%s: %s", self.task_id, done)

    def verify_upstream(self) -> None:
        """Check every upstream output against its manifest before ``build()`` reads it."""
        store = workdir_store()
        for task in self.upstream_tasks().values():
            if store is not None and task.stream_from_store:
                verify_store_upstream(store, task.store_rel(), hash_parquet=task.hash_parquet_on_read)
            else:   # with a store: fetched (and checked) once, then checked like a local output
                verify_upstream(task.readable_dir(), hash_parquet=task.hash_parquet_on_read)

    def explain(self):
        """This stage's :class:`~pipeline.stage.StageStatus` (up to date or why it will run)."""
        names = {label: task.stage_name for label, task in self.upstream_tasks().items()}
        return explain_key(workdir(), self.stage_key(), shared_hasher(workdir()), names,
                           task=self.task_name(), store=workdir_store())


def walk_dag(root: luigi.Task) -> list[luigi.Task]:
    """Every task reachable from ``root``, upstream first, each once."""
    order: list[luigi.Task] = []
    seen: set[str] = set()

    def visit(task: luigi.Task) -> None:
        if task.task_id in seen:
            return
        seen.add(task.task_id)
        for dep in flatten(task.requires()):
            visit(dep)
        order.append(task)

    visit(root)
    return order
