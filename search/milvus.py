"""Milvus, beyond one machine: an index's codes as ``BINARY_VECTOR`` rows with their ids, paths and labels, searched
by ``HAMMING`` distance. Optional (``pip install 'hashdistill[milvus]'``); nothing else in hashdistill imports it.

One ``pymilvus.MilvusClient`` code path serves every deployment; only the URI differs:

- Milvus Lite: a local file (``codes.db``), embedded in this process (tests, small deployments). Lite has one
  binary index type, ``BIN_FLAT`` (exact). The 3.x line of milvus-lite refuses binary vectors, so the extra pins
  the 2.5 line.
- Milvus Standalone or a cluster: ``http://host:19530`` (or ``https://``, ``tcp://``), with a token if it asks for
  one (``MILVUS_TOKEN``). There the collection gets ``BIN_IVF_FLAT`` with the faiss index's ``nlist`` (or
  about 2 sqrt(n)), and a search takes ``nprobe``.

The collection's description records what a query needs to be encoded the same way: the bit width and the
record of the model that encoded the database (as a hashdistill index file does).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from hashdistill.errors import UserError
from hashdistill.untrusted import MAX_BITS, parse_json, require_int, short

SERVER_SCHEMES = ("http://", "https://", "tcp://", "grpc://")
INSERT_BATCH = 10_000
MAX_PATH_BYTES = 65_535  # Milvus's longest VARCHAR
MAX_K = 16_384  # Milvus's largest search limit
SCHEMA = {"id": "INT64", "code": "BINARY_VECTOR", "path": "VARCHAR", "label": "INT64"}  # what export_index writes
DEFAULT_COLLECTION = "hashdistill"
FORMAT = "hashdistill-milvus"
COLLECTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")  # Milvus's rule for a collection's name


def check_collection_name(name: str) -> str:
    """``name`` if Milvus accepts it for a collection (letters, digits and underscores, not starting with a digit,
    at most 255 characters); checked here so that a bad name is a clear error, not pymilvus's logged traceback."""
    if not isinstance(name, str) or not COLLECTION_NAME.fullmatch(name):
        raise UserError(f"{short(name)} is not a Milvus collection name: use letters, digits and underscores, "
                        "starting with a letter or underscore, at most 255 characters")
    return name


def is_server(uri: str) -> bool:
    return str(uri).startswith(SERVER_SCHEMES)


def connect(uri: str, create: bool = False):
    """A MilvusClient for ``uri`` (a Lite file or a server), or a UserError that says what is missing. A Lite file
    that does not exist is created only with ``create`` (writing), never by a search."""
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise UserError("the Milvus backend needs pymilvus and milvus-lite: "
                        "pip install 'hashdistill[milvus]'") from None
    uri = str(uri)
    if not is_server(uri) and not uri.endswith(".db"):
        raise UserError(f"a Milvus URI is a Lite file ending in .db or a server address (http://host:19530); got "
                        f"{short(uri)}")
    if not is_server(uri) and not create and not Path(uri).is_file():
        raise UserError(f"no Milvus Lite file at {uri}; write one with `hashdistill index export --milvus {uri}`")
    try:
        return MilvusClient(uri=uri, token=os.environ.get("MILVUS_TOKEN", ""))
    except Exception as exc:  # noqa: BLE001 - pymilvus raises MilvusException and connection errors
        raise UserError(f"could not open Milvus at {uri}: {short(str(exc))}") from None


def export_index(index, uri: str, collection: str = DEFAULT_COLLECTION, force: bool = False) -> dict[str, Any]:
    """Write ``index`` (a :class:`~hashdistill.search.index.HashIndex`) into a new collection; returns what was
    written. An existing collection is replaced only with ``force``."""
    check_collection_name(collection)
    client = connect(uri, create=True)
    try:
        return _write_collection(client, index, uri, collection, force)
    finally:
        client.close()  # an open client keeps pinging: gRPC then logs the server's 'too_many_pings' on stderr


def _write_collection(client, index, uri: str, collection: str, force: bool) -> dict[str, Any]:
    from pymilvus import DataType, MilvusClient

    if client.has_collection(collection):
        if not force:
            raise UserError(f"collection '{collection}' already exists at {uri}; pass --force to replace it")
        client.drop_collection(collection)
    dim = 8 * index.codes.shape[1]
    record = {"format": FORMAT, "bits": index.bits, "model": index.model,
              "label_names": index.label_names}
    description = json.dumps(record)
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False, description=description)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("code", DataType.BINARY_VECTOR, dim=dim)
    schema.add_field("path", DataType.VARCHAR, max_length=MAX_PATH_BYTES)
    schema.add_field("label", DataType.INT64)
    params = client.prepare_index_params()
    if is_server(uri):
        nlist = index.structure.params.get("nlist") or max(1, min(65_536, round(2 * math.sqrt(len(index)))))
        params.add_index(field_name="code", index_type="BIN_IVF_FLAT", metric_type="HAMMING",
                         params={"nlist": int(nlist)})
        kind = {"index_type": "BIN_IVF_FLAT", "nlist": int(nlist)}
    else:
        params.add_index(field_name="code", index_type="BIN_FLAT", metric_type="HAMMING")
        kind = {"index_type": "BIN_FLAT"}
    client.create_collection(collection, schema=schema, index_params=params)
    for start in range(0, len(index), INSERT_BATCH):
        stop = min(start + INSERT_BATCH, len(index))
        client.insert(collection, [{"id": int(i), "code": code.tobytes(), "path": str(path), "label": int(label)}
                                   for i, code, path, label in zip(index.ids[start:stop], index.codes[start:stop],
                                                                   index.paths[start:stop], index.labels[start:stop])])
    client.flush(collection)
    client.load_collection(collection)
    return {"uri": uri, "collection": collection, "rows": len(index), "bits": index.bits, **kind}


def collection_record(client, collection: str) -> dict[str, Any]:
    """The bits and model record a collection written by :func:`export_index` carries, checked with its schema: a
    collection hashdistill did not write, or whose vectors are not as wide as its recorded codes, is refused."""
    if not client.has_collection(collection):
        raise UserError(f"no collection '{collection}' in this Milvus; write one with `hashdistill index export`")
    described = client.describe_collection(collection)
    text = described.get("description", "")
    try:
        record = parse_json(text, f"collection '{collection}'")
    except UserError:
        record = None
    if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("model"), dict):
        raise UserError(f"collection '{collection}' was not written by hashdistill (its description is "
                        f"{short(text)})")
    bits = require_int(record.get("bits"), f"collection '{collection}': its bit width", 1, MAX_BITS)
    fields = {field.get("name"): field for field in described.get("fields", []) if isinstance(field, dict)}
    kinds = {name: str(getattr(field.get("type"), "name", field.get("type"))) for name, field in fields.items()}
    if kinds != SCHEMA or not fields["id"].get("is_primary"):
        raise UserError(f"collection '{collection}' was not written by hashdistill: its fields are "
                        f"{short(kinds)}, expected {SCHEMA} (id the primary key)")
    dim = fields["code"].get("params", {}).get("dim")
    if dim != 8 * math.ceil(bits / 8):
        raise UserError(f"collection '{collection}' holds vectors of {short(dim)} bits but records {bits}-bit codes "
                        f"(expected {8 * math.ceil(bits / 8)}): a damaged or foreign collection")
    return record


class MilvusCollection:
    """A collection written by :func:`export_index`, searched like a HashIndex (see ``search_images``)."""

    def __init__(self, uri: str, collection: str = DEFAULT_COLLECTION):
        self.uri, self.collection = str(uri), check_collection_name(collection)
        self.client = connect(uri)
        try:
            record = collection_record(self.client, collection)
        except BaseException:
            self.client.close()
            raise
        self.bits, self.model = int(record["bits"]), record["model"]
        names = record.get("label_names")
        self.label_names = [str(n) for n in names] if isinstance(names, list) else []
        self.codes = np.zeros((0, math.ceil(self.bits / 8)), dtype=np.uint8)  # the query width, for checks

    def close(self) -> None:
        """Close the connection: an idle open client keeps pinging the server, and gRPC logs the server's
        'too_many_pings' answer on stderr, into whatever runs next."""
        self.client.close()

    def __enter__(self) -> MilvusCollection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def lookup(self, query_codes: np.ndarray, k: int, speed: int | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[list[str]]]:
        distances, ids, paths, labels = search(self.client, self.collection, query_codes, k, speed)
        return distances, ids, labels, paths

    def describe(self, speed: int | None = None) -> dict[str, Any]:
        server = is_server(self.uri)
        return {"kind": f"milvus {'BIN_IVF_FLAT' if server else 'BIN_FLAT'} at {self.uri}, collection "
                        f"'{self.collection}'", "params": {}, "items": self.client.get_collection_stats(
                            self.collection).get("row_count"), "speed_param": "nprobe" if server else None,
                "speed": speed, "recall": None if server else 1.0, "recall_k": None,
                "bytes_per_item": float(self.codes.shape[1] + 16)}


def search(client, collection: str, query_codes: np.ndarray, k: int, nprobe: int | None = None
           ) -> tuple[np.ndarray, np.ndarray, list[list[str]], np.ndarray]:
    """Hamming distances (int32), ids, paths and labels of the ``k`` nearest rows of each packed query code;
    -1 / '' where fewer than ``k`` came back."""
    if not 1 <= k <= MAX_K:
        raise UserError(f"k must be in [1, {MAX_K}] for Milvus, got {k}")
    params = {"metric_type": "HAMMING", "params": {"nprobe": int(nprobe)} if nprobe else {}}
    try:
        hits = client.search(collection, data=[row.tobytes() for row in query_codes], anns_field="code", limit=k,
                             search_params=params, output_fields=["path", "label"])
    except Exception as exc:  # noqa: BLE001 - pymilvus raises MilvusException and connection errors
        raise UserError(f"Milvus could not search collection '{collection}': {short(str(exc))}") from None
    q = len(query_codes)
    distances, ids, labels = np.full((q, k), -1, np.int32), np.full((q, k), -1, np.int64), np.full((q, k), -1, np.int64)
    paths: list[list[str]] = [[] for _ in range(q)]
    for row, found in enumerate(hits):
        for col, hit in enumerate(found):
            distances[row, col], ids[row, col] = round(hit["distance"]), hit["id"]
            labels[row, col] = hit["entity"]["label"]
            paths[row].append(hit["entity"]["path"])
    return distances, ids, paths, labels
