"""How the student a report scores was chosen, in words generated from the run's manifests.

Stage 2 (``DistillPrediction``) evaluates its student every ``eval_every`` steps and after the
last one, and keeps one evaluation's student. ``[PrepareData] selection`` decides which:

* ``dev`` (the reference's rule): the evaluation best on dev. Its dev score is the best of
  several looks at dev, so it flatters; the reports put the last evaluation beside it.
* ``holdout``: the evaluation best on held-out train rows (``holdout.parquet``: never
  augmented, cached or trained on); dev is only scored, and the reported dev score is that
  student's.

Every report sentence that says how a number was chosen (``ablations.md``, ``glue.md``, the
end-to-end reports of ``scripts/e2e_report.py``) comes from :class:`StudentSelection`, which is
built from the prepared data's manifest and the stage-2 outputs' manifests. A report therefore
cannot describe a rule its run did not use, and outputs that disagree about the rule are an
error rather than a report that picks one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from pipeline.errors import InputError

RULES = ("dev", "holdout")


@dataclass(frozen=True)
class StudentSelection:
    """The selection rule of a run and what it ran with (see the module docstring)."""

    rule: str                                 # "dev" or "holdout"
    eval_every: tuple[int, ...] = ()          # stage 2's evaluation interval(s), in steps (0: end only)
    held_out_rows: int | None = None          # holdout: rows of holdout.parquet
    held_out_fraction: float | None = None    # holdout: their share of the train split
    stratified_by: str | None = None          # holdout: how they were drawn

    @classmethod
    def from_manifests(cls, data: Mapping[str, Any], stage2: Sequence[Mapping[str, Any]],
                       where: Any = None) -> "StudentSelection":
        """The rule of the prepared data's manifest ``data``, checked against what every stage-2
        manifest in ``stage2`` recorded, with their ``eval_every``."""
        info = data.get("info") or {}
        rule = info.get("selection") or "dev"
        if rule not in RULES:
            raise InputError(f"prepared data records selection {rule!r}; expected one of {RULES}", where)
        for manifest in stage2:
            recorded = (manifest.get("info") or {}).get("selection") or "dev"
            if recorded != rule:
                raise InputError(f"a stage-2 output ({manifest.get('fingerprint')}) chose its student "
                                 f"by selection = {recorded}, the prepared data says {rule}: a report "
                                 "over both would describe one rule for two", where)
        intervals = tuple(sorted({int((m.get("params") or {}).get("eval_every", 0)) for m in stage2}))
        held = info.get("holdout") or {}
        return cls(rule, intervals, held.get("rows"), held.get("fraction"), held.get("stratified_by"))

    @property
    def held_out(self) -> bool:
        return self.rule == "holdout"

    @property
    def split(self) -> str:
        """The split the student was chosen on."""
        if not self.held_out:
            return "dev"
        return f"{self.held_out_rows} held-out train rows" if self.held_out_rows else "held-out train rows"

    def schedule(self) -> str:
        """When stage 2 evaluated: ``every 20 steps and after the last one``."""
        steps = [n for n in self.eval_every if n > 0]
        if not self.eval_every:
            return "at the evaluations it ran"
        if not steps:
            return "once, after the last step"
        every = " or ".join(str(n) for n in steps)
        return f"every {every} steps and after the last one"

    def sentence(self) -> str:
        """One sentence for a report's notes: how the student whose scores follow was chosen."""
        if self.held_out:
            drawn = []
            if self.held_out_fraction is not None:
                drawn.append(f"{100 * self.held_out_fraction:g} %")
            if self.stratified_by:
                drawn.append(f"stratified by {self.stratified_by}")
            drawn.append("never augmented or cached")
            return (f"Student selection: the best stage-2 evaluation on {self.split} ({', '.join(drawn)}); "
                    f"stage 2 evaluated {self.schedule()}, on those rows and on dev, and dev chose "
                    "nothing: the dev scores below are the kept student's, and the last evaluation's.")
        return (f"Student selection: the best stage-2 evaluation on dev (`[PrepareData] selection = dev`, "
                f"the reference's rule); stage 2 evaluated {self.schedule()} and kept the one best on "
                "dev, so its dev score is the best of several looks at dev.")

    def headline(self, metric: str) -> str:
        """The paragraph that says what the headline column of a table is."""
        if self.held_out:
            return (f"**Headline: the dev score of the student chosen on {self.split}.** The "
                    f"`dev {metric}` column is that student's dev evaluation: dev picked nothing, so "
                    "it is not the best of several looks at dev. The `last eval` column is the end "
                    "of training's score, beside it.")
        return (f"**Headline: the best stage-2 dev evaluation.** Stage 2 evaluated the student on dev "
                f"{self.schedule()} and kept the best; that best score is the `dev {metric}` column. "
                "Picking the best of several evaluations on the same dev set flatters it; the `last "
                "eval` column is the end of training's score, beside it, so the selection effect shows.")

    def column(self, metric: str) -> str:
        """The headline column's header."""
        return f"dev {metric} (chosen on held-out rows)" if self.held_out else f"dev {metric} (best dev eval)"

    def short(self) -> str:
        """A clause for a per-task list (glue.md)."""
        if self.held_out:
            return f"best stage-2 evaluation on {self.split} (dev only scored)"
        return "best stage-2 evaluation on dev (the reference's rule: optimistic)"

    def seed_rule(self, seeds: int) -> str:
        """How one student of several seeds is picked (the GLUE submission)."""
        return f"best {'held-out' if self.held_out else 'dev'} score of the {seeds} seed(s)"
