"""Item side information -> arrays aligned to item indices 1..N (0 is padding).

Two kinds, both optional (see `model.ItemTower`, which embeds them):
- attributes (`--item_features FILE`): categorical values per item, from JSON `{"item_id": [values]}` (the
  S3-Rec `*_item2attributes.json` files: one multi-valued feature) or a delimited file with a header, an item
  column and one column per feature, each cell one value or a `--feature_sep`-joined list;
- pretrained vectors (`--item_emb FILE`, repeatable): `.npz` with arrays `ids` and `vectors`, or `.npy`
  (rows = items) with the raw ids one per line in `<same name>.ids.txt`.

Value codes: 0 = padding (no value in that slot), 1 = unknown (an item the file does not list, or an empty
cell), 2.. = the file's values in sorted order.
"""
import json
import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from dataset import DataError
from readers.logs import ITEM_COLUMNS, column_key

PAD, UNKNOWN = 0, 1
FLOAT16_MAX = 65504.0  # side vectors are stored as float16: a larger |value| would become infinite
NON_FINITE_HINT = "not finite as float16, the stored precision; --non_finite zero treats such values as absent"


def non_finite_rows(matrix):
    """(rows,) True where a row of a float array holds NaN, an infinity or a value beyond float16's range."""
    within = np.abs(np.asarray(matrix)) <= FLOAT16_MAX  # False for NaN
    return ~within.all(axis=tuple(range(1, within.ndim)))


def first_non_finite(row):
    """'nan at position 3': the first value of a vector that non_finite_rows flags."""
    row = np.asarray(row).ravel()
    k = int(np.flatnonzero(~(np.abs(row) <= FLOAT16_MAX))[0])
    return f"{float(row[k])} at position {k}"


@dataclass
class Feature:
    name: str
    values: np.ndarray  # (N + 1, width) int64 codes
    vocab_size: int     # codes run 0..vocab_size - 1


@dataclass
class Vectors:
    name: str
    vectors: np.ndarray  # (N + 1, dim) float32 or float16; rows without a vector are 0
    present: np.ndarray  # (N + 1,) bool


@dataclass
class SideInfo:
    features: list = field(default_factory=list)
    vectors: list = field(default_factory=list)
    semantic: object = None  # readers.semantic_ids.SemanticIds with --semantic_ids (its code features are above)

    def spec(self):
        """Shapes that rebuild the model (saved in config.json; the arrays themselves live in the checkpoint)."""
        spec = {"features": [{"name": f.name, "vocab_size": f.vocab_size, "width": f.values.shape[1]}
                             for f in self.features],
                "vectors": [{"name": v.name, "dim": v.vectors.shape[1]} for v in self.vectors]}
        if self.semantic is not None:  # only then: the specs (and checkpoints) of runs without it are unchanged
            spec["semantic_ids"] = self.semantic.spec()
        return spec


def load_side_info(item_ids, feature_files=(), vector_files=(), sep="|", non_finite="error"):
    """item_ids: raw id of item 1..N (the training id map); non_finite: read_vectors' policy."""
    index = {str(raw): i + 1 for i, raw in enumerate(item_ids)}
    info = SideInfo()
    for path in feature_files:
        info.features += read_attributes(path, index, sep)
    for path in vector_files:
        info.vectors.append(read_vectors(path, index, non_finite))
    return info


def json_object(path, where, expected):
    """A JSON file holding one object, or a DataError starting with `where` that names `expected`."""
    try:
        with open(path, encoding="utf-8") as f:
            table = json.load(f)
    except ValueError as e:
        raise DataError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(table, dict):
        raise DataError(f"{where}: expected an object {expected}")
    return table


def read_attributes(path, index, sep="|"):
    """Categorical features of each item: a list of Feature, one per column (one for the JSON format)."""
    if not os.path.isfile(path):
        raise DataError(f"--item_features {path}: no such file")
    if path.endswith(".json"):
        table = json_object(path, f"--item_features {path}", '{"item_id": [values]}')
        cells = {str(k): v if isinstance(v, list) else [v] for k, v in table.items()}
        return [_encode("attributes", cells, index)]
    try:
        with open(path, encoding="utf-8") as f:
            header = f.readline()
        frame = pd.read_csv(path, sep="\t" if "\t" in header else ",", dtype=str, keep_default_na=False)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise DataError(f"--item_features {path}: cannot read as a delimited file with a header ({e})") from None
    keys = {column_key(c): c for c in frame.columns}
    item_col = next((keys[k] for k in ITEM_COLUMNS if k in keys), None)
    if item_col is None:
        raise DataError(f"--item_features {path}: header has no item column (looked for {', '.join(ITEM_COLUMNS)}; "
                        f"found {list(frame.columns)})")
    items = frame[item_col].astype(str).tolist()
    return [_encode(column_key(col),
                    {i: [v for v in cell.split(sep) if v] for i, cell in zip(items, frame[col], strict=True)},
                    index)
            for col in frame.columns if col != item_col]


def _encode(name, cells, index):
    """{raw item: [raw values]} -> Feature with codes per item index; values kept as strings."""
    vocab = {v: code for code, v in enumerate(sorted({str(v) for vals in cells.values() for v in vals}), start=2)}
    known = {index[item]: vals for item, vals in cells.items() if item in index}
    width = max([len(v) for v in known.values()] + [1])
    values = np.zeros((len(index) + 1, width), np.int64)
    values[1:, 0] = UNKNOWN  # items the file does not list
    for i, vals in known.items():
        codes = [vocab[str(v)] for v in vals] or [UNKNOWN]
        values[i, :] = PAD
        values[i, :len(codes)] = codes
    return Feature(name, values, len(vocab) + 2)


def read_vectors(path, index, non_finite="error"):
    """Pretrained per-item vectors aligned to item indices; items without one are flagged absent. A row with a
    non-finite value (in float16, as the tower stores it) is an error naming it, or (non_finite 'zero') absent."""
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                ids, matrix = z["ids"].astype(str), z["vectors"]
        else:
            matrix = np.load(path, allow_pickle=False)
            ids_path = os.path.splitext(path)[0] + ".ids.txt"
            with open(ids_path, encoding="utf-8") as f:
                ids = np.array(f.read().split())
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"--item_emb {path}: expected .npz with 'ids' and 'vectors', or .npy with a "
                        f"<name>.ids.txt beside it ({type(e).__name__}: {e})") from None
    if matrix.ndim != 2 or len(matrix) != len(ids):
        raise DataError(f"--item_emb {path}: {len(ids)} ids but vectors of shape {matrix.shape} "
                        f"(expected one row per id)")
    vectors = np.zeros((len(index) + 1, matrix.shape[1]), np.float32)
    present = np.zeros(len(index) + 1, bool)
    rows = np.array([index.get(str(i), 0) for i in ids])
    bad = (rows > 0) & non_finite_rows(matrix)
    if bad.any() and non_finite == "error":
        r = int(np.flatnonzero(bad)[0])
        raise DataError(f"--item_emb {path}: row {r} (item {str(ids[r])!r}) holds {first_non_finite(matrix[r])} "
                        f"({NON_FINITE_HINT})")
    if bad.any():
        print(f"warning: --item_emb {path}: {int(bad.sum())} vectors with non-finite values treated as absent "
              f"(--non_finite zero)")
    rows = np.where(bad, 0, rows)
    vectors[rows[rows > 0]] = matrix[rows > 0]
    present[rows[rows > 0]] = True
    return Vectors(os.path.splitext(os.path.basename(path))[0], vectors, present)
