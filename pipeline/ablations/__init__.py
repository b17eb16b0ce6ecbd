"""Stage ``Ablations``: the grid of trainer variants over one teacher cache, and its report.

:mod:`pipeline.ablations.report` parses ``ablations.toml`` and writes the table, CSV, plot and
summary from the variants' metrics.
"""
