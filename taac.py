"""The TAAC 2025 competition layouts -> Interactions with per-event actions / timestamps and side information.

Two layouts of one folder (`--data DIR`, detected, or `--data_format taac`):
- competition era: seq.jsonl (a JSON list per user of [user_id, item_id, user_feat, item_feat, action_type,
  timestamp] records; the profile record has no item), indexer.pkl, item_feat_dict.json, creative_emb/
  (emb_81_32.pkl, emb_{id}_{dim}/*.json lines of {anonymous_cid, emb});
- 2026 release: parquet folders seq/ (user_id, seq: list of {item_id, action_type, timestamp}), item_feat/,
  user_feat/, mm_emb/emb_{id}_{dim}_parquet/ (anonymous_cid, emb), and indexer.pkl.

Both load to the same arrays: users in file order, items by their re-id (1..N, as indexer['i'] numbers them),
feature values by their re-ids. Pickles are read by safe_pickle (an allow-list: data only, no code).
Feature codes follow features.py: 0 padding, 1 unknown (an item or user the file gives no value), 2.. values.
An item in seq without an entry in the item features gets 'unknown' for every feature (counted in the log).
"""
import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass

import numpy as np

import safe_pickle
from dataset import CACHE_ARRAYS, CACHE_VERSION, DataError, Interactions, cache_arrays, file_digest, read_cache, write_cache
from features import UNKNOWN, Feature, SideInfo, Vectors

MM_DIMS = {"81": 32, "82": 1024, "83": 3584, "84": 4096, "85": 3584, "86": 3584}
JSONL_PARTS = ("seq.jsonl", "indexer.pkl", "item_feat_dict.json")
PARQUET_PARTS = ("seq", "item_feat", "user_feat", "indexer.pkl")


@dataclass
class RawFeatures:
    """One entity's feature columns as read: feature id -> list (per row) of a value, a list, or None."""
    columns: dict


def detect_layout(folder):
    """'jsonl' or 'parquet'; a folder that is neither gets one line naming what is missing."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: no such folder (the competition layouts are folders)")
    has = lambda name: os.path.exists(os.path.join(folder, name))  # noqa: E731
    if has("seq.jsonl") or not has("seq"):
        missing = [p for p in JSONL_PARTS if not has(p)]
        if missing:
            raise DataError(f"{folder}: missing {', '.join(missing)} (the competition layout has "
                            f"{', '.join(JSONL_PARTS)}, creative_emb/; the 2026 release has {', '.join(PARQUET_PARTS)})")
        return "jsonl"
    missing = [p for p in PARQUET_PARTS if not has(p)]
    if missing:
        raise DataError(f"{folder}: missing {', '.join(missing)} (the 2026 release layout has "
                        f"{', '.join(PARQUET_PARTS)}, mm_emb/)")
    return "parquet"


def read_taac(folder, mm_ids=(), item_feature_ids=None, user_feature_ids=None, seq_file="seq.jsonl"):
    """Interactions (with actions, times, item_side, user_side) of a competition folder.

    mm_ids: multimodal feature ids (--mm_emb_id); *_feature_ids: which feature ids to use (None: all present);
    seq_file: the jsonl layout's sequences (predict_seq.jsonl for the users to predict)."""
    layout = "jsonl" if seq_file != "seq.jsonl" else detect_layout(folder)
    indexer = read_indexer(os.path.join(folder, "indexer.pkl"))
    if layout == "jsonl":
        users, offsets, items, actions, times, user_cols, item_cols = read_seq_jsonl(folder, seq_file)
        vectors = [read_jsonl_vectors(folder, mm, indexer) for mm in mm_ids]
    else:
        users, offsets, items, actions, times, user_cols, item_cols = read_parquet_folder(folder)
        vectors = [read_parquet_vectors(folder, mm, indexer) for mm in mm_ids]
    num_items = len(indexer["i"])
    bad = np.flatnonzero((items < 1) | (items > num_items))
    if len(bad):
        raise DataError(f"{folder}: event {bad[0]} has item re-id {items[bad[0]]}, outside indexer.pkl's "
                        f"1..{num_items}")
    raw_users = {reid: raw for raw, reid in indexer["u"].items()}
    raw_items = {reid: raw for raw, reid in indexer["i"].items()}
    data = Interactions(offsets, items.astype(np.int32), np.array([str(raw_users.get(u, u)) for u in users]),
                        np.array([str(raw_items.get(i, i)) for i in range(1, num_items + 1)]))
    data.actions, data.times = actions.astype(np.int8), times.astype(np.int64)
    features, continual = encode_columns(item_cols, num_items, item_feature_ids, "--item_feature_ids", folder, "item")
    data.item_side = SideInfo(features, vectors + continual)
    features, _ = encode_columns(user_cols, len(users), user_feature_ids, "--user_feature_ids", folder, "user",
                                 rows_from_zero=True)
    data.user_side = SideInfo(features)
    return data


def load_taac(folder, cache_dir=None, mm_ids=(), item_feature_ids=None, user_feature_ids=None):
    """read_taac through a cache keyed by the folder's content: later runs memory-map the arrays
    (multimodal vectors as float16) instead of parsing the folder again."""
    mm_ids = [str(m) for m in mm_ids]
    cache_file = None
    if cache_dir:
        key = json.dumps([CACHE_VERSION, folder_digest(folder), mm_ids, item_feature_ids, user_feature_ids])
        name = os.path.basename(os.path.normpath(folder)) or "taac"
        cache_file = os.path.join(cache_dir, f"taac-{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}")
        cached = read_cache(cache_file) if os.path.exists(cache_file) else None
        if cached is not None:
            return from_cache(*cached)
    data = read_taac(folder, mm_ids, item_feature_ids, user_feature_ids)
    if cache_file:
        arrays, meta = to_cache(data)
        write_cache(cache_file, arrays, meta)
    return data


def to_cache(data):
    arrays = {**cache_arrays(data), "actions": data.actions, "times": data.times}
    meta = {}
    for side, info in (("item", data.item_side), ("user", data.user_side)):
        meta[side] = {"features": [[f.name, f.vocab_size] for f in info.features], "vectors": [v.name for v in info.vectors]}
        for i, f in enumerate(info.features):
            arrays[f"{side}_feature{i}"] = f.values
        for j, v in enumerate(info.vectors):
            arrays[f"{side}_vectors{j}"], arrays[f"{side}_present{j}"] = v.vectors, v.present
    return arrays, meta


def from_cache(arrays, meta):
    data = Interactions(**{name: arrays[name] for name in CACHE_ARRAYS})
    data.actions, data.times = arrays["actions"], arrays["times"]
    for side in ("item", "user"):
        m = meta[side]
        info = SideInfo([Feature(name, arrays[f"{side}_feature{i}"], vocab) for i, (name, vocab) in enumerate(m["features"])],
                        [Vectors(name, arrays[f"{side}_vectors{j}"], arrays[f"{side}_present{j}"])
                         for j, name in enumerate(m["vectors"])])
        setattr(data, f"{side}_side", info)
    return data


def folder_digest(folder):
    """Content hash of every file under `folder` (names included)."""
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            h.update(os.path.relpath(path, folder).encode() + b"\0" + file_digest(path).encode())
    return h.hexdigest()


def read_indexer(path):
    try:
        indexer = safe_pickle.load(path)
    except (safe_pickle.UnsafePickleError, ValueError, OSError) as e:
        raise DataError(str(e) if str(e).startswith(path) else f"{path}: {e}") from None
    if not isinstance(indexer, dict) or not {"u", "i"} <= set(indexer):
        raise DataError(f"{path}: expected a dict with 'u' (users), 'i' (items) and 'f' (feature values) maps")
    return indexer


# ----------------------------------------------------------------------------- competition era (jsonl)

def read_seq_jsonl(folder, seq_file="seq.jsonl"):
    """Per user (one line each): re-id (or raw id, in predict_seq.jsonl), events (item, action, timestamp) and
    the profile's features; item features come from item_feat_dict.json."""
    path = os.path.join(folder, seq_file)
    users, lengths, items, actions, times, profiles = [], [], [], [], [], []
    expected = "a JSON list of [user_id, item_id, user_feat, item_feat, action_type, timestamp] records"

    def parse(records):
        events = [r for r in records if r[1] is not None]
        profile = next((r[2] for r in records if r[1] is None and r[2]), None)
        user = records[0][0]
        return (user if isinstance(user, str) else int(user), [int(r[1]) for r in events],
                [int(r[4]) if r[4] is not None else 1 for r in events], [int(r[5]) for r in events], profile)
    for where, (user, user_items, user_actions, user_times, profile) in json_lines(path, expected, parse):
        if not user_items:
            raise DataError(f"{where}: user {user} has no item records")
        users.append(user)
        items += user_items
        actions += user_actions
        times += user_times
        lengths.append(len(user_items))
        profiles.append(profile or {})
    if not users:
        raise DataError(f"{path}: file has no users")
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    item_path = os.path.join(folder, "item_feat_dict.json")
    try:
        with open(item_path, encoding="utf-8") as f:
            item_table = json.load(f)
    except ValueError as e:
        raise DataError(f"{item_path}: not valid JSON ({e})") from None
    num_items = max([int(k) for k in item_table] + [max(items)])
    item_rows = [item_table.get(str(i)) for i in range(1, num_items + 1)]
    return (np.array(users, dtype=object), offsets, np.array(items, np.int64), np.array(actions), np.array(times),
            dict_columns(profiles), dict_columns(item_rows))


def json_lines(path, expected, parse):
    """(file:line, parse(value)) of each non-blank line of a JSON-lines file; a line that is not JSON, or that
    `parse` cannot read, is one DataError naming its file and line and what was expected."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                parsed = parse(json.loads(line))
            except (ValueError, TypeError, IndexError, KeyError) as e:
                raise DataError(f"{path}:{lineno}: expected {expected} ({type(e).__name__}: {e})") from None
            yield f"{path}:{lineno}", parsed


def dict_columns(rows):
    """[{feature id: value}] (None for a row without features) -> {feature id: [value or None per row]}."""
    ids = sorted({k for r in rows if r for k in r})
    return {fid: [r.get(fid) if r else None for r in rows] for fid in ids}


def read_jsonl_vectors(folder, mm, indexer):
    """emb_81_32.pkl ({creative id: vector}) or emb_{id}_{dim}/*.json lines of {anonymous_cid, emb}."""
    dim = mm_dim(mm)
    base = os.path.join(folder, "creative_emb")
    pkl = os.path.join(base, f"emb_{mm}_{dim}.pkl")
    if os.path.isfile(pkl):
        try:
            table = safe_pickle.load(pkl)
        except (safe_pickle.UnsafePickleError, ValueError, OSError) as e:
            raise DataError(str(e)) from None
        pairs = ((cid, vec, f"{pkl}: creative {cid}") for cid, vec in table.items())
        return vectors_from_pairs(pairs, mm, dim, indexer)
    files = sorted(glob.glob(os.path.join(base, f"emb_{mm}_{dim}", "*.json")))
    if not files:
        raise DataError(f"--mm_emb_id {mm}: neither {pkl} nor {base}/emb_{mm}_{dim}/*.json exists "
                        f"(found {sorted(os.listdir(base)) if os.path.isdir(base) else 'no creative_emb/'})")

    def pairs():
        for path in files:
            for where, (cid, emb) in json_lines(path, '{"anonymous_cid": id, "emb": [floats]}',
                                                lambda row: (row["anonymous_cid"], row["emb"])):
                yield cid, emb, where
    return vectors_from_pairs(pairs(), mm, dim, indexer)


def mm_dim(mm):
    if str(mm) not in MM_DIMS:
        raise DataError(f"--mm_emb_id {mm}: unknown multimodal feature (expected one of {sorted(MM_DIMS)})")
    return MM_DIMS[str(mm)]


def vectors_from_pairs(pairs, mm, dim, indexer):
    """(creative id, vector, where) triples -> Vectors aligned to item re-ids, float16."""
    items = indexer["i"]
    out = np.zeros((len(items) + 1, dim), np.float16)
    present = np.zeros(len(items) + 1, bool)
    for cid, vec, where in pairs:
        reid = items.get(cid, items.get(str(cid)) if not isinstance(cid, str) else items.get(_int_or(cid)))
        if reid is None:
            continue  # a creative outside the training catalogue
        vec = np.asarray(vec, np.float32).ravel()
        if len(vec) != dim:
            raise DataError(f"{where}: vector of {len(vec)} values, expected {dim} (from the name emb_{mm}_{dim})")
        out[reid], present[reid] = vec, True
    return Vectors(f"mm_{mm}", out, present)


def _int_or(s):
    return int(s) if re.fullmatch(r"-?\d+", s) else s


# ----------------------------------------------------------------------------- 2026 release (parquet)

def _dataset(path):
    import pyarrow.dataset as ds
    try:
        return ds.dataset(path, format="parquet")
    except Exception as e:  # pyarrow raises its own error types for unreadable files
        raise DataError(f"{path}: cannot read as parquet ({type(e).__name__}: {e})") from None


def read_parquet_folder(folder):
    seq = _dataset(os.path.join(folder, "seq")).to_table(columns=["user_id", "seq"])
    users = seq.column("user_id").to_numpy()
    lists = seq.column("seq").combine_chunks()
    offsets = lists.offsets.to_numpy().astype(np.int64)
    offsets = offsets - offsets[0]
    events = lists.flatten()
    items, actions, times = (events.field(name).to_numpy(zero_copy_only=False)
                             for name in ("item_id", "action_type", "timestamp"))
    if (np.diff(offsets) == 0).any():
        bad = int(np.flatnonzero(np.diff(offsets) == 0)[0])
        raise DataError(f"{folder}/seq: user {users[bad]} has no events")
    item_cols = parquet_columns(os.path.join(folder, "item_feat"), "item_id", None)
    user_cols = parquet_columns(os.path.join(folder, "user_feat"), "user_id", users)
    return users, offsets, items.astype(np.int64), np.nan_to_num(actions, nan=1), times, user_cols, item_cols


def parquet_columns(path, id_col, row_ids):
    """{feature id: [value or None per row]}; rows are re-ids 1..max (row_ids None) or the given ids."""
    table = _dataset(path).to_table()
    if id_col not in table.column_names:
        raise DataError(f"{path}: no column {id_col!r} (found {table.column_names})")
    ids = table.column(id_col).to_numpy()
    if row_ids is None:
        position = ids - 1
        rows = int(ids.max(initial=0))
    else:
        lookup = {int(u): r for r, u in enumerate(row_ids)}
        position = np.array([lookup.get(int(u), -1) for u in ids])
        rows = len(row_ids)
    out = {}
    for name in table.column_names:
        if name == id_col:
            continue
        values = table.column(name).to_pylist()
        column = [None] * rows
        for p, v in zip(position, values):
            if p >= 0:
                column[p] = v
        out[name] = column
    return out


def read_parquet_vectors(folder, mm, indexer):
    dim = mm_dim(mm)
    path = os.path.join(folder, "mm_emb", f"emb_{mm}_{dim}_parquet")
    if not os.path.isdir(path):
        found = sorted(os.listdir(os.path.join(folder, "mm_emb"))) if os.path.isdir(os.path.join(folder, "mm_emb")) \
            else "no mm_emb/"
        raise DataError(f"--mm_emb_id {mm}: {path} does not exist (found {found})")
    items = indexer["i"]
    out = np.zeros((len(items) + 1, dim), np.float16)
    present = np.zeros(len(items) + 1, bool)
    for batch in _dataset(path).to_batches(columns=["anonymous_cid", "emb"], batch_size=65536):
        cids = batch.column("anonymous_cid").to_pylist()
        emb = batch.column("emb")
        lengths = np.diff(emb.offsets.to_numpy())
        if (lengths != dim).any():
            bad = int(np.flatnonzero(lengths != dim)[0])
            raise DataError(f"{path}: creative {cids[bad]} has a vector of {lengths[bad]} values, expected {dim} "
                            f"(from the name emb_{mm}_{dim})")
        matrix = emb.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
        reids = np.array([items.get(c, 0) for c in cids])
        keep = reids > 0
        out[reids[keep]], present[reids[keep]] = matrix[keep], True
    return Vectors(f"mm_{mm}", out, present)


# ----------------------------------------------------------------------------- feature codes

def encode_columns(columns, rows, wanted, flag_name, folder, entity, rows_from_zero=False):
    """Feature columns -> ([Feature], [Vectors]): integers (value re-ids) are sparse, lists are arrays, with
    codes value + 1 (0 padding, 1 unknown); float columns are continual, one-value Vectors (absent: None)."""
    present = sorted(columns, key=_int_or)
    if wanted is not None:
        missing = [fid for fid in wanted if str(fid) not in columns]
        if missing:
            raise DataError(f"{flag_name} {' '.join(map(str, missing))}: not in {folder}'s {entity} features "
                            f"(found {' '.join(present) or 'none'})")
        present = [str(fid) for fid in wanted]
    out, continual = [], []
    for fid in present:
        cells = columns[fid]
        if not rows_from_zero:
            cells = [None] + list(cells[:rows]) + [None] * max(0, rows - len(cells))  # row 0 is padding
        if _column_kind(cells) == "float":
            given = np.array([c is not None for c in cells])
            values = np.array([[float(c) if c is not None else 0.0] for c in cells], np.float16)
            continual.append(Vectors(fid, values, given))
            continue
        width = max([len(c) for c in cells if isinstance(c, list)] + [1])
        values = np.zeros((len(cells), width), np.int64)
        for r, c in enumerate(cells):
            if c is None or c == [] or (isinstance(c, str)):
                values[r, 0] = UNKNOWN
            elif isinstance(c, list):
                codes = [int(v) + 1 if isinstance(v, (int, np.integer)) else UNKNOWN for v in c]
                values[r, :len(codes)] = codes
            else:
                values[r, 0] = int(c) + 1
        if not rows_from_zero:
            values[0] = 0
        out.append(Feature(fid, values, int(values.max()) + 1))
    return out, continual


def _column_kind(cells):
    for c in cells:
        if isinstance(c, float) and not float(c).is_integer():
            return "float"
    return "categorical"
