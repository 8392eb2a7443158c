"""The TAAC 2025 competition layouts -> Interactions with per-event actions / timestamps and side information.

Two layouts of one folder (`--data DIR`, detected, or `--data_format taac`):
- competition era: seq.jsonl (a JSON list per user of [user_id, item_id, user_feat, item_feat, action_type,
  timestamp] records; the profile record has no item), indexer.pkl, item_feat_dict.json, creative_emb/
  (emb_81_32.pkl, emb_{id}_{dim}/*.json lines of {anonymous_cid, emb});
- 2026 release: parquet folders seq/ (user_id, seq: list of {item_id, action_type, timestamp}), item_feat/,
  user_feat/, mm_emb/emb_{id}_{dim}_parquet/ (anonymous_cid, emb), and indexer.pkl.

Both load to the same arrays: users in file order, items by their re-id (1..N, as indexer['i'] numbers them),
feature values by their re-ids. Pickles are read by safe_pickle (an allow-list: data only, no code).
Feature codes follow readers/features.py: 0 padding, 1 unknown (an item or user the file gives no value), 2.. values.
An item in seq without an entry in the item features gets 'unknown' for every feature (counted in the log).
A user on several lines (rows) is one user: all their events in time order (a stable sort: file order for equal
times), the profile of their first line that has one (a line counts the merged users). An item id outside
indexer.pkl's re-ids, or a vector / continual value that is NaN or infinite once stored as float16 (|x| > 65504),
is one DataError naming the file, line or id and feature; with non_finite='zero' such a value is absent instead
(its row zeroed, present False; a warning line counts them).
"""
import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass

import numpy as np

from dataset import DataError, Interactions
from readers import safe_pickle
from readers.cache import CACHE_ARRAYS, CACHE_VERSION, cache_arrays, file_digest, read_cache, write_cache
from readers.features import (
    FLOAT16_MAX,
    NON_FINITE_HINT,
    UNKNOWN,
    Feature,
    SideInfo,
    Vectors,
    first_non_finite,
    json_object,
    non_finite_rows,
)

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
                            f"{', '.join(JSONL_PARTS)}, creative_emb/; the 2026 release has "
                            f"{', '.join(PARQUET_PARTS)})")
        return "jsonl"
    missing = [p for p in PARQUET_PARTS if not has(p)]
    if missing:
        raise DataError(f"{folder}: missing {', '.join(missing)} (the 2026 release layout has "
                        f"{', '.join(PARQUET_PARTS)}, mm_emb/)")
    return "parquet"


def read_taac(folder, mm_ids=(), item_feature_ids=None, user_feature_ids=None, seq_file="seq.jsonl",
              non_finite="error"):
    """Interactions (with actions, times, item_side, user_side) of a competition folder.

    mm_ids: multimodal feature ids (--mm_emb_id); *_feature_ids: which feature ids to use (None: all present);
    seq_file: the jsonl layout's sequences (predict_seq.jsonl for the users to predict); non_finite: a vector or
    continual value that is NaN / infinite in float16 is an error ('error') or absent ('zero')."""
    layout = "jsonl" if seq_file != "seq.jsonl" else detect_layout(folder)
    indexer = read_indexer(os.path.join(folder, "indexer.pkl"))
    num_items = len(indexer["i"])
    if layout == "jsonl":
        users, offsets, items, actions, times, user_cols, item_cols = read_seq_jsonl(folder, seq_file, num_items)
        sources = os.path.join(folder, seq_file), os.path.join(folder, "item_feat_dict.json")
        vectors = [read_jsonl_vectors(folder, mm, indexer, non_finite) for mm in mm_ids]
    else:
        users, offsets, items, actions, times, user_cols, item_cols = read_parquet_folder(folder, num_items)
        sources = os.path.join(folder, "user_feat"), os.path.join(folder, "item_feat")
        vectors = [read_parquet_vectors(folder, mm, indexer, non_finite) for mm in mm_ids]
    bad = np.flatnonzero((items < 1) | (items > num_items))
    if len(bad):
        raise DataError(f"{folder}: event {bad[0]} has item re-id {items[bad[0]]}, outside indexer.pkl's "
                        f"1..{num_items}")
    raw_users = {reid: raw for raw, reid in indexer["u"].items()}
    raw_items = {reid: raw for raw, reid in indexer["i"].items()}
    data = Interactions(offsets, items.astype(np.int32), np.array([str(raw_users.get(u, u)) for u in users]),
                        np.array([str(raw_items.get(i, i)) for i in range(1, num_items + 1)]))
    data.actions, data.times = actions.astype(np.int8), times.astype(np.int64)
    features, continual = encode_columns(item_cols, num_items, item_feature_ids, "--item_feature_ids", folder, "item",
                                         source=sources[1], non_finite=non_finite)
    data.item_side = SideInfo(features, vectors + continual)
    features, _ = encode_columns(user_cols, len(users), user_feature_ids, "--user_feature_ids", folder, "user",
                                 rows_from_zero=True, source=sources[0], labels=users, non_finite=non_finite)
    data.user_side = SideInfo(features)
    data.feature_codes = feature_codes_digest(indexer)
    return data


def feature_codes_digest(indexer):
    """SHA-256 (hex) of indexer.pkl's feature-value map ('f'): equal digests mean feature codes mean the same
    values (a checkpoint keeps it; eval/competition.py compares the evaluation folder's)."""
    def canonical(x):  # keys and values as strings: raw values may be ints or strings
        return {str(k): canonical(v) for k, v in x.items()} if isinstance(x, dict) else str(x)
    text = json.dumps(canonical(indexer.get("f", {})), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def load_taac(folder, cache_dir=None, mm_ids=(), item_feature_ids=None, user_feature_ids=None, verify_cache=False,
              non_finite="error"):
    """read_taac through a cache keyed by the folder's content: later runs memory-map the arrays
    (multimodal vectors as float16) instead of parsing the folder again (verify_cache: check every cached
    array's SHA-256, not only sizes and shapes; non_finite: read_taac's policy)."""
    mm_ids = [str(m) for m in mm_ids]
    settings = json.dumps([folder_digest(folder, mm_ids), mm_ids, item_feature_ids, user_feature_ids])
    fingerprint = "sha256:" + hashlib.sha256(settings.encode()).hexdigest()
    cache_file = None
    if cache_dir:
        key = json.dumps([CACHE_VERSION, settings, non_finite])  # a 'zero' parse is never served to 'error'
        name = os.path.basename(os.path.normpath(folder)) or "taac"
        cache_file = os.path.join(cache_dir, f"taac-{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}")
        cached = read_cache(cache_file, verify_cache) if os.path.exists(cache_file) else None
        if cached is not None:
            data = from_cache(*cached)
            data.fingerprint = fingerprint
            return data
    data = read_taac(folder, mm_ids, item_feature_ids, user_feature_ids, non_finite=non_finite)
    if cache_file:
        arrays, meta = to_cache(data)
        write_cache(cache_file, arrays, meta)
    data.fingerprint = fingerprint
    return data


def to_cache(data):
    arrays = {**cache_arrays(data), "actions": data.actions, "times": data.times}
    meta = {"feature_codes": data.feature_codes}
    for side, info in (("item", data.item_side), ("user", data.user_side)):
        meta[side] = {"features": [[f.name, f.vocab_size] for f in info.features],
                      "vectors": [v.name for v in info.vectors]}
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
        info = SideInfo([Feature(name, arrays[f"{side}_feature{i}"], vocab)
                         for i, (name, vocab) in enumerate(m["features"])],
                        [Vectors(name, arrays[f"{side}_vectors{j}"], arrays[f"{side}_present{j}"])
                         for j, name in enumerate(m["vectors"])])
        setattr(data, f"{side}_side", info)
    data.feature_codes = meta.get("feature_codes")
    return data


def folder_digest(folder, mm_ids=()):
    """Content hash (names included) of the files read_taac reads from `folder` with these multimodal ids:
    a file it never opens (a README, another feature's vectors, a cache kept inside) changes nothing."""
    h = hashlib.sha256()
    for path in read_files(folder, mm_ids):
        h.update(os.path.relpath(path, folder).encode() + b"\0" + file_digest(path).encode())
    return h.hexdigest()


def read_files(folder, mm_ids=()):
    """The files read_taac opens, sorted: the layout's parts and the chosen multimodal vectors (dot-files out)."""
    if detect_layout(folder) == "jsonl":
        parts = list(JSONL_PARTS)
        for mm in mm_ids:
            name = f"creative_emb/emb_{mm}_{mm_dim(mm)}"
            parts.append(f"{name}.pkl" if os.path.isfile(os.path.join(folder, f"{name}.pkl")) else name)
    else:
        parts = list(PARQUET_PARTS) + [f"mm_emb/emb_{mm}_{mm_dim(mm)}_parquet" for mm in mm_ids]
    paths = []
    for part in parts:
        path = os.path.join(folder, part)
        if os.path.isfile(path):
            paths.append(path)
        for root, dirs, files in os.walk(path):  # a folder part: every file below it
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            paths += [os.path.join(root, f) for f in files if not f.startswith(".")]
    return sorted(paths)


def read_indexer(path):
    try:
        indexer = safe_pickle.load(path)
    except (safe_pickle.UnsafePickleError, ValueError, OSError) as e:
        raise DataError(str(e) if str(e).startswith(path) else f"{path}: {e}") from None
    if not isinstance(indexer, dict) or not {"u", "i"} <= set(indexer):
        raise DataError(f"{path}: expected a dict with 'u' (users), 'i' (items) and 'f' (feature values) maps")
    return indexer


# ----------------------------------------------------------------------------- competition era (jsonl)

def read_seq_jsonl(folder, seq_file, num_items):
    """Per user: re-id (or raw id, in predict_seq.jsonl), events (item, action, timestamp) and the profile's
    features; item features come from item_feat_dict.json. num_items: indexer.pkl's item count (an item id
    outside 1..num_items is an error naming its line); a user on several lines is one user (merge_users)."""
    path = os.path.join(folder, seq_file)
    users, lengths, items, actions, times, profiles = [], [], [], [], [], []
    expected = "a JSON list of [user_id, item_id, user_feat, item_feat, action_type, timestamp] records"

    def parse(records):
        events = [r for r in records if r[1] is not None]
        profile = next((r[2] for r in records if r[1] is None and r[2]), None)
        if profile is not None and not isinstance(profile, dict):
            raise TypeError(f"user_feat is a {type(profile).__name__}, not an object")
        user = records[0][0]
        return (user if isinstance(user, str) else int(user), [int(r[1]) for r in events],
                [int(r[4]) if r[4] is not None else 1 for r in events], [int(r[5]) for r in events], profile)
    for where, (user, user_items, user_actions, user_times, profile) in json_lines(path, expected, parse):
        if not user_items:
            raise DataError(f"{where}: user {user} has no item records")
        check_events(where, user_items, user_actions, user_times, num_items)
        users.append(user)
        items += user_items
        actions += user_actions
        times += user_times
        lengths.append(len(user_items))
        profiles.append(profile or {})
    if not users:
        raise DataError(f"{path}: file has no users")
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    items, actions, times = (np.array(a, np.int64) for a in (items, actions, times))
    merged = merge_users(users, offsets, times, path, "line")
    if merged is not None:
        owner, first, order, offsets = merged
        items, actions, times = items[order], actions[order], times[order]
        kept = [{} for _ in first]
        for line, user in enumerate(owner):  # the profile of the user's first line that has one
            kept[user] = kept[user] or profiles[line]
        users, profiles = [users[i] for i in first], kept
    item_table = read_item_table(os.path.join(folder, "item_feat_dict.json"), num_items)
    item_rows = [item_table.get(str(i)) for i in range(1, num_items + 1)]
    return (np.array(users, dtype=object), offsets, items, actions, times, dict_columns(profiles),
            dict_columns(item_rows))


def check_events(where, items, actions, times, num_items):
    """One line's events, before any array is sized or typed by them: item ids must be indexer.pkl's re-ids
    1..num_items, action types fit 0..127 (int8) and timestamps int64."""
    if min(items) < 1 or max(items) > num_items:
        bad = next(i for i in items if not 1 <= i <= num_items)
        raise DataError(f"{where}: item id {bad} is not in indexer.pkl's item re-ids 1..{num_items}")
    if min(actions) < 0 or max(actions) > 127:
        raise DataError(f"{where}: action_type {next(a for a in actions if not 0 <= a <= 127)} is outside 0..127")
    if min(times) < -2 ** 63 or max(times) >= 2 ** 63:
        raise DataError(f"{where}: timestamp {next(t for t in times if not -2 ** 63 <= t < 2 ** 63)} is beyond int64")


def read_item_table(path, num_items):
    """item_feat_dict.json: {item re-id: {feature id: value}}. A key outside indexer.pkl's item re-ids 1..num_items
    is never looked up (as in the baseline's reader) and is skipped, counted in one line; a row that is not an
    object is an error naming its key."""
    table = json_object(path, path, "{item re-id: {feature id: value}}")
    outside = [key for key in table if not (re.fullmatch(r"\d+", key) and 1 <= int(key) <= num_items)]
    if outside:
        print(f"{path}: {len(outside)} key(s) outside indexer.pkl's item re-ids 1..{num_items} skipped "
              f"(e.g. {outside[0]!r})")
    for key, row in table.items():
        if row is not None and not isinstance(row, dict):
            raise DataError(f"{path}: key {key!r} holds a {type(row).__name__}, expected an object "
                            f"{{feature id: value}}")
    return table


def merge_users(users, offsets, times, source, unit):
    """A user on several lines (rows) of `source` becomes one user, at their first line's place, whose events are
    all their lines' events in time order (a stable sort: file order for equal times). Returns (the merged user
    of each line, each merged user's first line, the event order, offsets), or None when no user repeats."""
    group = {}
    owner = np.fromiter((group.setdefault(u, len(group)) for u in users), np.int64, len(users))
    if len(group) == len(users):
        return None
    event_owner = np.repeat(owner, np.diff(offsets))
    merged = np.bincount(owner) > 1
    order = np.lexsort((np.where(merged[event_owner], times, 0), event_owner))  # lexsort is stable
    offsets = np.concatenate([[0], np.cumsum(np.bincount(event_owner, minlength=len(group)))]).astype(np.int64)
    print(f"{source}: {int(merged.sum())} user(s) on more than one {unit} merged into one sequence each "
          f"(events in time order, the first profile kept)")
    return owner, np.unique(owner, return_index=True)[1], order, offsets


def json_lines(path, expected, parse):
    """(file:line, parse(value)) of each non-blank line of a JSON-lines file; a line that is not JSON, or that
    `parse` cannot read, is one DataError naming its file and line and what was expected."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                parsed = parse(json.loads(line))
            except (ValueError, TypeError, IndexError, KeyError, OverflowError) as e:
                raise DataError(f"{path}:{lineno}: expected {expected} ({type(e).__name__}: {e})") from None
            yield f"{path}:{lineno}", parsed


def dict_columns(rows):
    """[{feature id: value}] (None for a row without features) -> {feature id: [value or None per row]}."""
    ids = sorted({k for r in rows if r for k in r})
    return {fid: [r.get(fid) if r else None for r in rows] for fid in ids}


def read_jsonl_vectors(folder, mm, indexer, non_finite="error"):
    """emb_81_32.pkl ({creative id: vector}) or emb_{id}_{dim}/*.json lines of {anonymous_cid, emb}."""
    dim = mm_dim(mm)
    base = os.path.join(folder, "creative_emb")
    pkl = os.path.join(base, f"emb_{mm}_{dim}.pkl")
    if os.path.isfile(pkl):
        try:
            table = safe_pickle.load(pkl)
        except (safe_pickle.UnsafePickleError, ValueError, OSError) as e:
            raise DataError(str(e)) from None
        if not isinstance(table, dict):
            raise DataError(f"{pkl}: expected a dict {{creative id: vector}}, found a {type(table).__name__}")
        pairs = ((cid, vec, pkl) for cid, vec in table.items())
        return vectors_from_pairs(pairs, mm, dim, indexer, non_finite, pkl)
    files = sorted(glob.glob(os.path.join(base, f"emb_{mm}_{dim}", "*.json")))
    if not files:
        raise DataError(f"--mm_emb_id {mm}: neither {pkl} nor {base}/emb_{mm}_{dim}/*.json exists "
                        f"(found {sorted(os.listdir(base)) if os.path.isdir(base) else 'no creative_emb/'})")

    def pairs():
        for path in files:
            for where, (cid, emb) in json_lines(path, '{"anonymous_cid": id, "emb": [floats]}',
                                                lambda row: (row["anonymous_cid"], row["emb"])):
                yield cid, emb, where
    return vectors_from_pairs(pairs(), mm, dim, indexer, non_finite, os.path.join(base, f"emb_{mm}_{dim}"))


def mm_dim(mm):
    if str(mm) not in MM_DIMS:
        raise DataError(f"--mm_emb_id {mm}: unknown multimodal feature (expected one of {sorted(MM_DIMS)})")
    return MM_DIMS[str(mm)]


def vectors_from_pairs(pairs, mm, dim, indexer, non_finite="error", source=""):
    """(creative id, vector, where) triples -> Vectors aligned to item re-ids, float16. A vector with a value
    that is not finite in float16 is an error naming it, or (non_finite 'zero') absent."""
    items = indexer["i"]
    out = np.zeros((len(items) + 1, dim), np.float16)
    present = np.zeros(len(items) + 1, bool)
    dropped = 0
    for cid, vec, where in pairs:
        reid = items.get(cid, items.get(str(cid)) if not isinstance(cid, str) else items.get(_int_or(cid)))
        if reid is None:
            continue  # a creative outside the training catalogue
        try:
            vec = np.asarray(vec, np.float64).ravel()  # float64: a huge value is reported, not overflowed
        except (TypeError, ValueError):
            raise DataError(f"{where}: creative {cid}'s vector is not a list of numbers") from None
        if len(vec) != dim:
            raise DataError(f"{where}: vector of {len(vec)} values, expected {dim} (from the name emb_{mm}_{dim}; "
                            f"creative {cid})")
        if not (np.abs(vec) <= FLOAT16_MAX).all():
            if non_finite == "error":
                raise DataError(f"{where}: creative {cid}'s emb_{mm} vector holds {first_non_finite(vec)} "
                                f"({NON_FINITE_HINT})")
            out[reid], present[reid], dropped = 0, False, dropped + 1
            continue
        out[reid], present[reid] = vec, True
    warn_dropped(source, dropped, f"emb_{mm} vectors with non-finite values")
    return Vectors(f"mm_{mm}", out, present)


def warn_dropped(source, count, what):
    """The one warning line of non_finite 'zero'."""
    if count:
        print(f"warning: {source}: {count} {what} treated as absent (--non_finite zero)")


def _int_or(s):
    return int(s) if re.fullmatch(r"-?\d+", s) else s


# ----------------------------------------------------------------------------- 2026 release (parquet)

def parquet_dataset(path):
    """The pyarrow dataset of a parquet file or folder (of parts); DataError if pyarrow cannot open it."""
    import pyarrow.dataset as ds
    try:
        return ds.dataset(path, format="parquet")
    except Exception as e:  # pyarrow raises its own error types for unreadable files
        raise DataError(f"{path}: cannot read as parquet ({type(e).__name__}: {e})") from None


def read_parquet_folder(folder, num_items):
    """seq/, item_feat/, user_feat/ -> the arrays read_seq_jsonl returns (a user on several rows is one user)."""
    path = os.path.join(folder, "seq")
    seq = parquet_dataset(path)
    missing = [c for c in ("user_id", "seq") if c not in seq.schema.names]
    if missing:
        raise DataError(f"{path}: no column {missing[0]!r} (found {seq.schema.names})")
    seq = seq.to_table(columns=["user_id", "seq"])
    if seq.num_rows == 0:
        raise DataError(f"{path}: no rows (no users to read)")
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
    bad = np.flatnonzero(~((items >= 1) & (items <= num_items)))  # before an array is sized by them
    if len(bad):
        row = int(np.searchsorted(offsets, bad[0], side="right")) - 1
        raise DataError(f"{path}: row {row + 1} (user {users[row]}): item id {items[bad[0]]} is not in indexer.pkl's "
                        f"item re-ids 1..{num_items}")
    items, actions = items.astype(np.int64), np.nan_to_num(actions, nan=1)
    merged = merge_users(users, offsets, times, path, "row")
    if merged is not None:
        _, first, order, offsets = merged
        users, items, actions, times = users[first], items[order], actions[order], times[order]
    item_cols = parquet_columns(os.path.join(folder, "item_feat"), "item_id", None, num_items)
    user_cols = parquet_columns(os.path.join(folder, "user_feat"), "user_id", users)
    return users, offsets, items, actions, times, user_cols, item_cols


def parquet_columns(path, id_col, row_ids, num_items=None):
    """{feature id: [value or None per row]}; rows are item re-ids 1..num_items (row_ids None: an id outside is
    an error naming it) or the given ids (others ignored). A repeated id keeps its first value."""
    table = parquet_dataset(path).to_table()
    if id_col not in table.column_names:
        raise DataError(f"{path}: no column {id_col!r} (found {table.column_names})")
    ids = table.column(id_col).to_numpy()
    if row_ids is None:  # rows of items outside the indexer are never looked up: skipped, counted
        outside = ~((ids >= 1) & (ids <= num_items))
        if outside.any():
            print(f"{path}: {int(outside.sum())} row(s) whose {id_col} is outside indexer.pkl's item re-ids "
                  f"1..{num_items} skipped (e.g. {ids[outside][0]})")
        position = np.where(outside, -1, ids).astype(np.int64) - np.where(outside, 0, 1)
        rows = num_items
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
        for p, v in zip(position, values, strict=True):
            if p >= 0 and column[p] is None:
                column[p] = v
        out[name] = column
    return out


def read_parquet_vectors(folder, mm, indexer, non_finite="error"):
    dim = mm_dim(mm)
    path = os.path.join(folder, "mm_emb", f"emb_{mm}_{dim}_parquet")
    if not os.path.isdir(path):
        found = sorted(os.listdir(os.path.join(folder, "mm_emb"))) if os.path.isdir(os.path.join(folder, "mm_emb")) \
            else "no mm_emb/"
        raise DataError(f"--mm_emb_id {mm}: {path} does not exist (found {found})")
    items = indexer["i"]
    out = np.zeros((len(items) + 1, dim), np.float16)
    present = np.zeros(len(items) + 1, bool)
    dropped = 0
    for batch in parquet_dataset(path).to_batches(columns=["anonymous_cid", "emb"], batch_size=65536):
        cids = batch.column("anonymous_cid").to_pylist()
        emb = batch.column("emb")
        lengths = np.diff(emb.offsets.to_numpy())
        if (lengths != dim).any():
            bad = int(np.flatnonzero(lengths != dim)[0])
            raise DataError(f"{path}: creative {cids[bad]} has a vector of {lengths[bad]} values, expected {dim} "
                            f"(from the name emb_{mm}_{dim})")
        matrix = emb.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
        reids = np.array([items.get(c, 0) for c in cids])
        bad = (reids > 0) & non_finite_rows(matrix)
        if bad.any() and non_finite == "error":
            r = int(np.flatnonzero(bad)[0])
            raise DataError(f"{path}: creative {cids[r]}'s emb_{mm} vector holds {first_non_finite(matrix[r])} "
                            f"({NON_FINITE_HINT})")
        dropped += int(bad.sum())
        keep = (reids > 0) & ~bad
        out[reids[keep]], present[reids[keep]] = matrix[keep], True
    warn_dropped(path, dropped, f"emb_{mm} vectors with non-finite values")
    return Vectors(f"mm_{mm}", out, present)


# ----------------------------------------------------------------------------- feature codes

def encode_columns(columns, rows, wanted, flag_name, folder, entity, rows_from_zero=False, source=None, labels=None,
                   non_finite="error"):
    """Feature columns -> ([Feature], [Vectors]): integers (value re-ids) are sparse, lists are arrays, with
    codes value + 1 (0 padding, 1 unknown); float columns are continual, one-value Vectors (absent: None).
    source, labels (the id of each row; default its index), non_finite: see continual_vectors."""
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
            continual.append(continual_vectors(fid, cells, source or folder, entity, labels, non_finite))
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


def continual_vectors(fid, cells, source, entity, labels, non_finite):
    """A float column -> one-value Vectors (None: absent). A value not finite in float16 (the stored precision) is
    an error naming its file, row (its label, default its index) and feature, or (non_finite 'zero') absent."""
    given = np.array([c is not None for c in cells])
    values = np.array([[float(c) if c is not None else 0.0] for c in cells], np.float64)
    bad = non_finite_rows(values)
    if bad.any() and non_finite == "error":
        r = int(np.flatnonzero(bad)[0])
        raise DataError(f"{source}: {entity} {labels[r] if labels is not None else r}: feature {fid} is "
                        f"{float(values[r, 0])} ({NON_FINITE_HINT})")
    warn_dropped(source, int(bad.sum()), f"non-finite values of {entity} feature {fid}")
    values[bad], given[bad] = 0, False
    return Vectors(fid, values.astype(np.float16), given)


def _column_kind(cells):
    for c in cells:
        if isinstance(c, float) and not float(c).is_integer():
            return "float"
    return "categorical"
