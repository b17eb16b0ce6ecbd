"""Stage ``FineTuneTeacher``: load the teacher, check it fits the task, fine-tune it if needed.

:mod:`pipeline.teacher.finetune` tells a trained classifier head from a fresh one, checks the
label mapping and fine-tunes the teacher when its head was never trained.
"""
