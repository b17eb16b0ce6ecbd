"""The GLUE harness: every task's teacher and students in one table, and the server's files.

``paper`` holds the TinyBERT paper's Table 1 figures and which metric each GLUE column
reports; ``table`` turns per-task predictions into the table (intervals, averages, compute);
``submission`` writes and checks the GLUE server's ``<TASK>.tsv`` files; ``predict`` runs a
saved classifier over a prepared split. Nothing here imports luigi (``tasks/glue.py`` wires it).
"""
