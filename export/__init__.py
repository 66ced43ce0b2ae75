"""ONNX export and the torch-free edge retrieval runtime.

Imports nothing heavy: ``hashdistill.export.runtime`` must work with numpy and onnxruntime alone.
"""
