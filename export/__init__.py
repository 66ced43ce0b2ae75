"""ONNX export and the torch-free edge runtime (search indexes live in ``hashdistill.search``).

Imports nothing heavy: ``hashdistill.export.runtime`` must work with numpy and onnxruntime alone.

Modules (import the one you need):

- ``verify``: ``export_checkpoint`` (load + export + parity check, what the CLI calls), ``verify_export``
- ``onnx_export``: ``export_onnx``, the single-file ONNX writer; ``graph``: the traced torch module
- ``loading``: ``load_any_model`` for teacher, student and ternary-student checkpoints
- ``runtime``: ``EdgeModel`` (numpy + onnxruntime only): pre-process, encode, classify, OOD
- ``onnx_encoder``: an exported file as an encoder of the evaluation path (``hashdistill.evaluate``)
- ``metadata``: the ONNX metadata_props contract; ``images``: image loading and pre-processing
"""
