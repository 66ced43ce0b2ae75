"""Search: packed binary codes in Hamming indexes.

Modules (import the one you need):

- ``index``: ``HashIndex``, ``build_index``, ``add_to_index``, ``merge_indexes``, ``load_index``, ``search_images``
  (faiss binary indexes, stored as checked arrays in one ``.npz`` file)
- ``index_kinds``: the search structures (``flat``, ``ivf``, ``hnsw``) behind an index, one class per kind
- ``sources``: what an index reads: a model to encode with (ONNX file or checkpoint) and a set of images
"""
