"""Stage ``ExportStudent``: the distilled student in the forms people deploy small encoders in.

:mod:`pipeline.deploy.onnx_export` exports a stage-2 student to ONNX with torch's own exporter
(dynamic batch and sequence axes), checks the file with onnxruntime against PyTorch on the dev
set, optionally quantises it to dynamic int8 (onnxruntime's quantiser) and scores that
variant's dev metric against the fp32 one with the ablations' paired bootstrap
(:mod:`pipeline.ablations.statistics`), and times both runtimes side by side with the same
timer and inputs as :mod:`distill.speed`. Nothing here imports luigi (``tasks/deploy.py``
wires it).
"""
