"""Interaction logs -> compact arrays -> leave-one-out split -> vectorised batches.

Everything is kept as two flat arrays: `items` (all interactions, grouped by user,
chronological) and `offsets` (user u owns items[offsets[u]:offsets[u+1]]). Item
indices run 1..N with 0 reserved for padding.
"""
import codecs
import hashlib
import itertools
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd
import torch
from pandas.tseries.api import guess_datetime_format

from files import remove_stale_temp_files

FORMATS = ("lines", "pairs", "delimited")
CACHE_VERSION = 5  # 2: canonical-integer ids ('007' stays a string); 3: a folder of .npy, memory-mapped; 4: manifest
# 5: the manifest records each array's dtype, shape, size and SHA-256, and its own checksum
CACHE_ARRAYS = ("offsets", "items", "user_ids", "item_ids", "history", "split_counts")
USER_COLUMNS = ("user_id", "user", "userid", "uid", "visitorid", "customer_id")
ITEM_COLUMNS = ("item_id", "item", "itemid", "iid", "movie_id", "movieid", "product_id", "track_id")
TIME_COLUMNS = ("timestamp", "time", "ts", "datetime", "date", "event_time", "unix_time")


class DataError(ValueError):
    """Bad input data; the message names the file (and line) and what was expected."""


@dataclass
class Interactions:
    offsets: np.ndarray  # (U+1,) int64
    items: np.ndarray    # (I,) int32 item indices in 1..N
    user_ids: np.ndarray  # (U,) raw user ids as strings
    item_ids: np.ndarray  # (N,) raw item ids as strings; item_ids[i - 1] is item i
    # Derived once and cached beside the rest (None: LeaveOneOut derives them):
    history: np.ndarray = None       # (I,) int32: items, each user's training part sorted (membership tests)
    split_counts: np.ndarray = None  # (2, N+1) int64: interactions per item before validation / test targets
    # Competition logs (readers/taac.py) also carry, per event and per entity:
    actions: np.ndarray = None  # (I,) int8 action type of each interaction (0 exposure, 1 click, 2 conversion)
    times: np.ndarray = None    # (I,) int64 unix seconds of each interaction
    item_side: object = None    # features.SideInfo of items 0..N (row 0 padding)
    user_side: object = None    # features.SideInfo of users 0..U-1
    # What the arrays were read from: a content hash of the file or folder (and its parse settings), or the
    # synthetic generator's settings. A checkpoint keeps it, so data changed under a run is noticed.
    fingerprint: str = None
    feature_codes: str = None   # competition folders: hash of indexer.pkl's feature-value map (what codes mean)

    @property
    def num_users(self):
        return len(self.offsets) - 1

    @property
    def num_items(self):
        return len(self.item_ids)

    @property
    def lengths(self):
        return np.diff(self.offsets)


# ----------------------------------------------------------------------------- readers

ID_TYPES = ("auto", "int", "str")
# Canonical integers only ('007' stays a string, so raw ids round-trip); <= 18 digits fits int64.
INTEGER_ID = r"0|-?[1-9][0-9]{0,17}"  # not '-0': it would merge with '0'


CHUNK_ROWS = 1 << 21  # rows parsed at a time: ids become int64 (or fixed-width strings) chunk by chunk


class _IdColumn:
    """One id column, read a chunk at a time. Integer ids are kept as int64 and string ids as fixed-width
    numpy strings, never as one Python object per interaction: a 20M-line log parses in a few GB, not tens.

    auto: a column whose ids are mostly integers is an integer column, so a stray non-integer in it
    (a corrupt line, a second header, another format pasted in) is an error, not a new item.
    """

    def __init__(self, path, role, id_type):
        self.path, self.role, self.id_type = path, role, id_type
        self.parts, self.rows, self.integers, self.first_bad = [], 0, 0, None

    def add(self, values, lines):
        values = np.asarray(values, dtype=object)
        self.rows += len(values)
        if self.id_type == "str":
            self.parts.append(values.astype(str))
            return
        is_int = pd.Series(values, dtype=object).str.fullmatch(INTEGER_ID).to_numpy(bool)
        self.integers += int(is_int.sum())
        if is_int.all():
            self.parts.append(values.astype(np.int64))
            return
        if self.first_bad is None:
            bad = int(np.flatnonzero(~is_int)[0])
            self.first_bad = (lines[bad], values[bad])
        self.parts.append(values.astype(str))

    def codes(self):
        """Dense codes 0..K-1 per row (numeric order for an integer column, else string order) and the K raw ids."""
        integer = self.integers == self.rows
        if not integer and self.id_type != "str" and (self.id_type == "int" or self.integers > self.rows / 2):
            line, value = self.first_bad
            raise DataError(f"{self.path}:{line}: {self.role} id {value!r} is not an integer (expected integer ids"
                            f"{', like most of this file' if self.id_type == 'auto' else ''}; --id_type str reads "
                            f"every id as a string)")
        raw = np.concatenate([part if integer else part.astype(str) for part in self.parts])
        self.parts = []
        uniques, codes = np.unique(raw, return_inverse=True)
        return codes, uniques.astype(str)


def _group(users, items, order_key=None):
    """Group interactions by user (stable, so file order or `order_key` is chronology)."""
    user_codes, user_ids = users.codes()
    item_codes, item_ids = items.codes()
    if order_key is None:
        order = np.argsort(user_codes, kind="stable")
    else:
        order = np.lexsort((order_key, user_codes))  # by user, then time; stable for equal times
    counts = np.bincount(user_codes, minlength=len(user_ids))
    offsets = np.zeros(len(user_ids) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    items = (item_codes[order] + 1).astype(np.int32)
    return Interactions(offsets, items, user_ids, item_ids)


def read_lines(path, id_type="auto"):
    """S3-Rec style: one user per line, `user item1 item2 ...`, chronological."""
    users, items, counts, line_numbers = [], [], [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise DataError(f"{path}:{lineno}: expected 'user item1 item2 ...', got {line.strip()!r}")
            users.append(parts[0])
            items.extend(parts[1:])
            counts.append(len(parts) - 1)
            line_numbers.append(lineno)
    if not users:
        raise DataError(f"{path}: file has no interactions")
    user_col, item_col = _IdColumn(path, "user", id_type), _IdColumn(path, "item", id_type)
    counts = np.array(counts)
    lines = np.repeat(line_numbers, counts)
    user_col.add(np.repeat(np.array(users, dtype=object), counts), lines)
    item_col.add(items, lines)
    return _group(user_col, item_col)


def read_pairs(path, id_type="auto"):
    """SASRec style: one interaction per line, `user item`, chronological within each user."""
    expected = "2 fields, 'user item'"
    users, items = _IdColumn(path, "user", id_type), _IdColumn(path, "item", id_type)
    for frame, lines in _read_chunks(path, expected, 1, sep=r"\s+", header=None, names=["user", "item"]):
        users.add(frame["user"].to_numpy(), lines)
        items.add(frame["item"].to_numpy(), lines)
    return _group(users, items)


def read_delimited(path, user_col=None, item_col=None, time_col=None, id_type="auto"):
    """CSV / TSV / RecBole .inter with a header naming user, item and optional timestamp columns."""
    with open(path, encoding="utf-8") as f:
        header = f.readline()
    sep = "\t" if "\t" in header else ("," if "," in header else (";" if ";" in header else r"\s+"))
    try:
        names = {column_key(c): c for c in pd.read_csv(path, sep=sep, header=0, nrows=0, dtype=str).columns}
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty") from None
    user = _pick_column(names, user_col, USER_COLUMNS, "user", path)
    item = _pick_column(names, item_col, ITEM_COLUMNS, "item", path)
    time = _pick_column(names, time_col, TIME_COLUMNS, "timestamp", path, required=False)
    columns = [c for c in (user, item, time) if c is not None]
    users, items = _IdColumn(path, "user", id_type), _IdColumn(path, "item", id_type)
    times = _TimeColumn(path, time) if time is not None else None
    for frame, lines in _read_chunks(path, "as many fields as the header", 2, sep=sep, header=0, keep=columns,
                                     described=f"values in columns {columns}"):
        users.add(frame[user].to_numpy(), lines)
        items.add(frame[item].to_numpy(), lines)
        if times:
            times.add(frame[time], lines)
    return _group(users, items, times.keys() if times else None)


class _TimeColumn:
    """A time column as sort keys: numbers, or dates in one format. The first chunk decides which (and the
    date format, as pandas infers it from the first value), so every chunk is read the same way; a cell
    that does not fit is an error naming its line."""

    def __init__(self, path, column):
        self.path, self.column, self.parts, self.dates, self.format = path, column, [], None, None

    def add(self, values, lines):
        if self.dates is None:
            self.dates = bool(pd.to_numeric(values, errors="coerce").isna().any())
            self.format = guess_datetime_format(values.iloc[0]) if self.dates else None
        if self.dates:
            key = pd.to_datetime(values, format=self.format, errors="coerce").astype("int64")
            bad = key.to_numpy() == np.iinfo(np.int64).min
        else:
            key = pd.to_numeric(values, errors="coerce")
            bad = key.isna().to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            expected = f"a date like the first one ({self.format or 'format not recognised'})" if self.dates \
                else "a number, like the first rows"
            raise DataError(f"{self.path}:{lines[i]}: column '{self.column}' expected {expected}, "
                            f"got {values.iloc[i]!r}")
        self.parts.append(key.to_numpy())

    def keys(self):
        return np.concatenate(self.parts)


def _read_chunks(path, expected, first_line, keep=None, described=None, **kwargs):
    """(rows, file line numbers) of complete rows, CHUNK_ROWS at a time; blank lines skipped; a row with a
    missing field, or a line with too many, is an error naming its line."""
    rows = 0
    try:
        reader = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""], skip_blank_lines=False,
                             chunksize=CHUNK_ROWS, **kwargs)
        for frame in reader:
            frame = frame[keep] if keep else frame
            frame, lines = _complete_rows(frame, path, described or expected, first_line)
            rows += len(frame)
            if len(frame):
                yield frame, lines
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty") from None
    except pd.errors.ParserError as e:  # pandas: "... Expected 2 fields in line 4, saw 3"
        found = re.search(r"line (\d+), saw (\d+)", str(e))
        if found:
            raise DataError(f"{path}:{found[1]}: expected {expected}, saw {found[2]} fields") from None
        raise DataError(f"{path}: could not parse ({e})") from None
    if not rows:
        raise DataError(f"{path}: file has no interactions")


def _complete_rows(frame, path, expected, first_line):
    """Drop blank lines; a row with a missing field is an error naming its line. Returns (rows, line numbers)."""
    lines = frame.index.to_numpy() + first_line
    present = frame.notna().to_numpy()
    blank = ~present.any(axis=1)
    if blank.any():
        frame, lines, present = frame[~blank], lines[~blank], present[~blank]
    partial = ~present.all(axis=1)
    if partial.any():
        raise DataError(f"{path}:{lines[np.flatnonzero(partial)[0]]}: missing field, expected {expected}")
    return frame, lines


def column_key(name):
    return str(name).split(":")[0].strip().lower()  # RecBole headers look like 'user_id:token'


def _pick_column(names, wanted, candidates, role, path, required=True):
    if wanted is not None:
        key = column_key(wanted)
        if key not in names:
            raise DataError(f"{path}: no column named {wanted!r} for the {role}; header has {list(names.values())}")
        return names[key]
    for key in candidates:
        if key in names:
            return names[key]
    if required:
        raise DataError(f"{path}: header has no {role} column (looked for {', '.join(candidates)}; "
                        f"found {list(names.values())}); name it with --{role if role != 'timestamp' else 'time'}_col")
    return None


def detect_format(path):
    """Guess 'delimited' (header row), 'lines' (a line with 3+ fields) or 'pairs' (always 2 fields)."""
    with open(path, encoding="utf-8") as f:
        head = [line for _, line in zip(range(2000), f) if line.strip()]
    if not head:
        raise DataError(f"{path}: file is empty")
    first = re.split(r"[\t,;\s]+", head[0].strip())
    if any(column_key(tok) in USER_COLUMNS + ITEM_COLUMNS for tok in first):
        return "delimited"
    if any(len(line.split()) > 2 for line in head):
        return "lines"
    return "pairs"


# ----------------------------------------------------------------------------- loading + cache

def file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def first_non_utf8(path):
    """(file byte offset, line, reason) of the first byte of `path` that is not UTF-8, or None. Read in binary on
    the error path only: a text reader's UnicodeDecodeError counts bytes from its current decode chunk."""
    decoder, offset, lines = codecs.getincrementaldecoder("utf-8")(), 0, 1  # offset: bytes fed to the decoder
    with open(path, "rb") as f:
        for block in itertools.chain(iter(lambda: f.read(1 << 20), b""), [None]):  # None: the end of the file
            pending = decoder.getstate()[0]  # bytes of an unfinished character, carried from the last block
            try:
                decoder.decode(block or b"", final=block is None)
            except UnicodeDecodeError as e:  # e.object is pending + block; a pending byte is never a newline
                return offset - len(pending) + e.start, lines + e.object[:e.start].count(b"\n"), e.reason
            offset, lines = offset + len(block or b""), lines + (block or b"").count(b"\n")
    return None


def load_interactions(path, data_format=None, cache_dir=None, user_col=None, item_col=None, time_col=None,
                      id_type="auto", synthetic_seed=0, verify_cache=False):
    """Read a log (or make the synthetic one), using a cache keyed by the file's content hash
    (verify_cache: check every cached array's SHA-256, not only sizes and shapes)."""
    if path == "synthetic":
        data = make_synthetic(seed=synthetic_seed)
        data.fingerprint = f"synthetic:seed={synthetic_seed}"
        return data
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such data file")
    if data_format is not None and data_format not in FORMATS:
        raise DataError(f"--data_format must be one of {FORMATS}, got {data_format!r}")
    if id_type not in ID_TYPES:
        raise DataError(f"--id_type must be one of {ID_TYPES}, got {id_type!r}")
    try:
        data_format = data_format or detect_format(path)
        settings = json.dumps([file_digest(path), data_format, user_col, item_col, time_col, id_type])
        fingerprint = "sha256:" + hashlib.sha256(settings.encode()).hexdigest()
        cache_file = None
        if cache_dir:
            key = json.dumps([CACHE_VERSION, settings])
            stem = os.path.splitext(os.path.basename(path))[0]
            cache_file = os.path.join(cache_dir, f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}")
            if os.path.exists(cache_file):
                cached = _read_cache(cache_file, verify_cache)
                if cached is not None:
                    cached.fingerprint = fingerprint
                    return cached
        if data_format == "lines":
            data = read_lines(path, id_type)
        elif data_format == "pairs":
            data = read_pairs(path, id_type)
        else:
            data = read_delimited(path, user_col, item_col, time_col, id_type)
    except UnicodeDecodeError as e:  # e.start counts from the reader's decode chunk: find the byte in the file
        offset, line, reason = first_non_utf8(path) or (e.start, None, e.reason)
        where = f"{path}:{line}" if line else path
        raise DataError(f"{where}: not a UTF-8 text file (byte {offset}: {reason})") from None
    if cache_file:
        write_cache(cache_file, cache_arrays(data))
    data.fingerprint = fingerprint
    return data


def read_cache(cache_folder, verify=False):
    """(arrays by name, memory-mapped; the manifest's metadata) of a cache folder, or None: parse again.
    A log far larger than RAM pays only for the pages a step touches. Plain .npy (allow_pickle=False): a
    cache file can never run code. Every load checks what reads no data: the manifest against its checksum,
    each file's size, each array's dtype and shape; `verify` also each file's SHA-256 (reads every byte).
    A damaged cache (any of these differs, an array missing or not an array) is removed."""
    try:
        manifest = _signed_manifest(cache_folder)
        arrays = {name: _mapped_array(cache_folder, name, entry, verify)
                  for name, entry in manifest["arrays"].items()}
    except (FileNotFoundError, ValueError, EOFError, KeyError, TypeError) as e:
        print(f"warning: ignoring the damaged data cache {cache_folder} ({type(e).__name__}: {e})")
        shutil.rmtree(cache_folder, ignore_errors=True)
        return None
    except OSError as e:  # e.g. too many open files: the cache may be fine, leave it
        print(f"warning: cannot read the data cache {cache_folder} ({e}); parsing the log instead")
        return None
    return arrays, manifest.get("meta")


def _signed_manifest(cache_folder):
    """manifest.json, checked against its own checksum (an edited or partly overwritten manifest is damage)."""
    with open(os.path.join(cache_folder, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    if not isinstance(manifest, dict) or manifest.pop("checksum", None) != manifest_checksum(manifest):
        raise ValueError("manifest.json does not match its checksum")
    if not isinstance(manifest.get("arrays"), dict):
        raise TypeError("manifest.json has no table of arrays")
    return manifest


def manifest_checksum(manifest):
    """SHA-256 of a manifest's canonical JSON (sorted keys, no spaces), however the file was formatted."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _mapped_array(cache_folder, name, entry, verify):
    """One cached array, memory-mapped, checked against its manifest entry (its SHA-256 only if `verify`)."""
    path = os.path.join(cache_folder, f"{name}.npy")
    size = os.path.getsize(path)
    if size != entry["bytes"]:  # a truncated or extended file
        raise ValueError(f"{name}.npy: {size} bytes, the manifest records {entry['bytes']}")
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    if (array.dtype.str, list(array.shape)) != (entry["dtype"], entry["shape"]):  # an edited header
        raise ValueError(f"{name}.npy: dtype {array.dtype.str} and shape {tuple(array.shape)}, the manifest "
                         f"records {entry['dtype']} and {tuple(entry['shape'])}")
    if verify and file_digest(path) != entry["sha256"]:  # bytes changed in place: only a full read sees it
        raise ValueError(f"{name}.npy: its SHA-256 differs from the manifest's")
    return array


def _read_cache(cache_folder, verify=False):
    cached = read_cache(cache_folder, verify)
    return None if cached is None else Interactions(**cached[0])


def cache_arrays(data):
    """The arrays of `data` a cache keeps, with the split's derived ones (computed once, here)."""
    if data.history is None:
        split = LeaveOneOut(data)
        data.history, data.split_counts = split.history, np.stack([split.item_counts(w) for w in SPLITS])
    return {name: getattr(data, name) for name in CACHE_ARRAYS}


def write_cache(cache_folder, arrays, meta=None):
    """Write named arrays + a manifest (each array's dtype, shape, size and SHA-256 of its bytes as written, and
    the manifest's own checksum) into a temporary folder, read the arrays back against those digests, then
    rename the folder into place: readers never see half a cache, nor one that read back differently. The
    folder is unique to this process (tempfile), and those of killed processes are removed."""
    parent = os.path.dirname(cache_folder)
    tmp = None
    try:
        os.makedirs(parent, exist_ok=True)
        remove_stale_temp_files(parent)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(cache_folder)}.tmp{os.getpid()}-", dir=parent)
        entries = {name: _write_array(os.path.join(tmp, f"{name}.npy"), array) for name, array in arrays.items()}
        manifest = json.loads(json.dumps({"arrays": entries, "meta": meta}))  # as a reader will load it
        with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump({**manifest, "checksum": manifest_checksum(manifest)}, f)
            f.flush()
            os.fsync(f.fileno())
        differs = [name for name, entry in entries.items()
                   if file_digest(os.path.join(tmp, f"{name}.npy")) != entry["sha256"]]
        if differs:  # never serve it: the finally below removes it
            print(f"warning: the data cache {cache_folder} is not kept: {differs[0]}.npy read back differently "
                  f"from what was written; continuing without it")
            return
        os.rename(tmp, cache_folder)
    except OSError as e:  # a read-only cache folder only costs the speed-up; another process may have won
        if not os.path.isdir(cache_folder):  # strerror is None for an OSError raised without an errno
            print(f"warning: cannot write the data cache {cache_folder} ({e.strerror or e}); continuing without it")
    finally:
        if tmp and os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _write_array(path, array):
    """Save one array as .npy, fsynced; its manifest entry, the SHA-256 taken of the bytes on their way out."""
    array = np.asanyarray(array)
    with open(path, "wb") as f:
        out = _HashingWriter(f)
        np.save(out, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    return {"dtype": array.dtype.str, "shape": list(array.shape), "bytes": out.size, "sha256": out.sha256.hexdigest()}


class _HashingWriter:
    """A file being written that also hashes and counts what goes through it (np.save writes it in chunks)."""

    def __init__(self, file):
        self.file, self.sha256, self.size = file, hashlib.sha256(), 0

    def write(self, data):
        self.sha256.update(data)
        self.size += memoryview(data).nbytes
        return self.file.write(data)


def make_synthetic(num_users=4000, num_items=3000, num_topics=40, seed=0):
    """A deterministic log with real sequential structure.

    Items belong to topics and each topic orders its items in a chain. A user mostly
    follows the chain (item -> its successor), sometimes jumps to a popular item of the
    same topic, and sometimes moves to one of the topic's few favourite next topics.
    Popularity is Zipf-skewed, so the popularity baseline is fair but beatable.
    """
    rng = np.random.default_rng(seed)
    topic = rng.integers(num_topics, size=num_items)
    popularity = 1.0 / np.arange(1, num_items + 1) ** 0.9
    popularity = popularity[rng.permutation(num_items)]
    members = [np.flatnonzero(topic == t) for t in range(num_topics)]
    successor = np.empty(num_items, np.int64)
    for m in members:
        chain = rng.permutation(m)
        successor[chain] = np.roll(chain, -1)
    topic_probs = [popularity[m] / popularity[m].sum() for m in members]
    next_topics = rng.integers(num_topics, size=(num_topics, 3))
    lengths = np.clip(rng.geometric(1 / 12, size=num_users) + 3, 4, 80)
    items = np.empty(lengths.sum(), np.int32)
    pos = 0
    for n in lengths:
        t = rng.integers(num_topics)
        cur = rng.choice(members[t], p=topic_probs[t])
        for _ in range(n):
            items[pos] = cur + 1
            pos += 1
            r = rng.random()
            if r < 0.6:
                cur = successor[cur]
            else:
                if r > 0.85:
                    t = next_topics[topic[cur], rng.integers(3)]
                else:
                    t = topic[cur]
                cur = rng.choice(members[t], p=topic_probs[t])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return Interactions(offsets, items, np.arange(1, num_users + 1).astype(str),
                        np.arange(1, num_items + 1).astype(str))


# ----------------------------------------------------------------------------- split

def ragged_positions(starts, lengths):
    """(rows, flat_index) for the concatenated ranges [starts[r], starts[r] + lengths[r])."""
    lengths = np.asarray(lengths, np.int64)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    first = np.cumsum(lengths) - lengths
    return rows, np.repeat(np.asarray(starts, np.int64) - first, lengths) + np.arange(lengths.sum())


def left_padded(items, ends, lengths, width):
    """(B, width) int64 matrix: row b is items[ends[b] - lengths[b]:ends[b]] right-aligned, 0 before it."""
    cols = np.arange(width)
    idx = ends[:, None] - width + cols[None, :]
    valid = cols[None, :] >= width - lengths[:, None]
    return np.where(valid, items[np.where(valid, idx, 0)], 0).astype(np.int64)


SPLITS = ("valid", "test")


def train_lengths(lengths):
    """Leave-one-out: a user with >= 3 items holds out the last two (validation, test); shorter ones hold out none."""
    return np.where(lengths >= 3, lengths - 2, lengths)


def sorted_history(data, chunk=1 << 22):
    """A copy of `items` with each user's training part sorted, for binary-search membership tests.
    Built a block of users at a time, so the temporaries stay small however long the log is."""
    history = np.array(data.items, dtype=np.int32)
    lengths = data.lengths
    bounds = np.searchsorted(np.cumsum(lengths), np.arange(chunk, len(history), chunk))
    for users in np.split(np.arange(data.num_users), bounds):
        if not len(users):
            continue
        first = data.offsets[users[0]]
        rows, idx = ragged_positions(data.offsets[users] - first, train_lengths(lengths[users]))
        block = history[first:data.offsets[users[-1] + 1]]
        keys = np.sort(rows * (data.num_items + 1) + block[idx])  # rows stay in order, items sort inside each
        block[idx] = keys % (data.num_items + 1)
    return history


class LeaveOneOut:
    """Last item = test target, second-last = validation target, the rest trains.

    Users with fewer than 3 items train on everything and are not evaluated.
    """

    def __init__(self, data: Interactions, eval_actions=None):
        self.data, self.eval_actions = data, eval_actions
        lengths = data.lengths
        self.starts = data.offsets[:-1]
        self.eval_users = np.flatnonzero(lengths >= 3)
        self.num_short_users = int((lengths < 3).sum())
        self.train_lengths = train_lengths(lengths)
        self.history = data.history if data.history is not None else sorted_history(data)

    def eval_arrays(self, split, filtered=True):
        """For `split` in {'valid', 'test'}: users, history end (exclusive), history length, target item.
        filtered: only targets of --eval_actions (when the log has actions)."""
        users = self.eval_users
        hist_len = self.train_lengths[users] + (1 if split == "test" else 0)
        ends = self.starts[users] + hist_len
        if filtered and self.eval_actions is not None and self.data.actions is not None:  # targets of the chosen actions only
            keep = np.isin(self.data.actions[ends], self.eval_actions)
            users, hist_len, ends = users[keep], hist_len[keep], ends[keep]
        return users, ends, hist_len, self.data.items[ends].astype(np.int64)

    def item_counts(self, split):
        """Interactions per item that precede `split`'s targets (training part, plus validation items for test)."""
        data = self.data
        if data.split_counts is not None:  # from the cache: no pass over the log
            return np.array(data.split_counts[SPLITS.index(split)])
        counts = np.bincount(data.items, minlength=data.num_items + 1)
        for held_out in ("test",) if split == "test" else ("test", "valid"):
            counts -= np.bincount(self.eval_arrays(held_out, filtered=False)[3], minlength=data.num_items + 1)
        counts[0] = 0
        return counts

    def in_history(self, users, items):
        """Boolean mask: items[b, ...] is in the training history of users[b]. A vectorised binary search
        inside each user's sorted history: it reads only these users' pages of a memory-mapped log."""
        shape = users.shape + (1,) * (items.ndim - users.ndim)
        lo = np.broadcast_to(self.starts[users].reshape(shape), items.shape)
        lengths = self.train_lengths[users]
        end = lo + lengths.reshape(shape)
        hi, last = end, len(self.history) - 1
        for _ in range(int(lengths.max(initial=0)).bit_length()):
            mid = (lo + hi) >> 1
            active, right = lo < hi, self.history[np.minimum(mid, last)] < items
            lo, hi = np.where(active & right, mid + 1, lo), np.where(active & ~right, mid, hi)
        return (lo < end) & (self.history[np.minimum(lo, last)] == items)


# ----------------------------------------------------------------------------- training batches

@dataclass
class Batch:
    """One step's named tensors, (B, W) left-padded; only positions with positives != 0 count. The
    optional fields come with logs that have them (competition folders): what each input event was, and
    who the user is."""
    inputs: torch.Tensor     # (B, W) item ids of the history
    positives: torch.Tensor  # (B, W) the next item at each position (0: padding)
    users: torch.Tensor      # (B,) user indices
    rows: torch.Tensor       # (R,) flat index of each trained position in the (B x W) grid (found on the host)
    negatives: Optional[torch.Tensor] = None  # (B, W) one sampled negative per real position, if the loss asks
    actions: Optional[torch.Tensor] = None    # (B, W) action type + 1 of each input event (0: padding)
    times: Optional[torch.Tensor] = None      # (B, W, 4) time codes of each input event (see time_codes)
    user_features: Optional[torch.Tensor] = None  # (B, F) the users' feature codes, features side by side
    weights: Optional[torch.Tensor] = None    # (R,) loss weight of each row (by its target's action), None: all 1

    FIELDS = ("inputs", "positives", "users", "rows", "negatives", "actions", "times", "user_features", "weights")

    def to(self, device):
        """A copy on `device`; on CUDA through page-locked memory, so the copies run asynchronously."""
        def move(t):
            if t is None or t.device == device:
                return t
            return (t.pin_memory() if device.type == "cuda" else t).to(device, non_blocking=True)
        return Batch(*(move(getattr(self, f)) for f in self.FIELDS))

    @property
    def num_users(self):
        return len(self.users)


TIME_BUCKETS = 33  # codes of a gap: 0 padding, 1 none (first event / no prediction time), 2..32 log2 buckets
UNKNOWN_PREDICTION_TIME = 0.1  # training positions whose gap to the prediction time is hidden ("none")


def gap_codes(seconds):
    return 2 + np.minimum(30, np.floor(np.log2(1.0 + np.maximum(seconds, 0)))).astype(np.int64)


def time_codes(times, idx, valid, starts, known_end):
    """(B, W, 4) codes of each input event: gap to the previous event of its user, gap to the next one (the
    prediction time of that position; known when idx + 1 < known_end), hour of day + 1, weekday + 1."""
    t = times[idx]
    has_prev = valid & (idx - 1 >= starts[:, None])
    has_next = valid & (idx + 1 < known_end[:, None])
    prev = np.where(has_prev, gap_codes(t - times[np.maximum(idx - 1, 0)]), 1)
    nxt = np.where(has_next, gap_codes(times[np.minimum(idx + 1, len(times) - 1)] - t), 1)
    hour, weekday = (t // 3600) % 24 + 1, (t // 86400 + 3) % 7 + 1  # 1970-01-01 was a Thursday (Monday = 1)
    return np.where(valid[..., None], np.stack([prev, nxt, hour, weekday], -1), 0)


def user_feature_codes(data, users):
    """(B, F) the users' feature codes side by side, or None when the log has no user features."""
    side = data.user_side
    if side is None or not side.features:
        return None
    return torch.from_numpy(np.concatenate([np.asarray(f.values[users]) for f in side.features], 1).astype(np.int64))


def history_batch(data, users, ends, lengths, width, known_end=None):
    """The Batch of users whose histories are items[ends - lengths:ends] (no positives: evaluation and
    inference). known_end: events before it have known timestamps (default ends + 1: the target's time,
    the prediction time, is known)."""
    idx, valid = event_index(ends, lengths, width)
    inputs = np.where(valid, data.items[idx], 0).astype(np.int64)
    empty = torch.zeros(0, dtype=torch.long)
    batch = Batch(torch.from_numpy(inputs), torch.zeros_like(torch.from_numpy(inputs)), torch.from_numpy(users),
                  empty)
    add_context(batch, data, users, idx, valid, ends + 1 if known_end is None else known_end)
    return batch


def length_batches(lengths, batch_size):
    """Index arrays of at most `batch_size` users, in order of history length: a left-padded batch is as
    wide as its longest history, so batching similar lengths saves the padding's compute (Beauty's
    validation: 4.5x faster)."""
    order = np.argsort(lengths, kind="stable")
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def event_index(ends, lengths, width):
    """(B, W) flat index of each left-padded position (0 at padding) and the mask of real positions."""
    cols = np.arange(width)
    valid = cols[None, :] >= width - lengths[:, None]
    return np.where(valid, ends[:, None] - width + cols[None, :], 0), valid


def add_context(batch, data, users, idx, valid, known_end):
    """Fill a batch's per-event and per-user fields from the log's arrays, where the log has them."""
    if data.actions is not None:
        batch.actions = torch.from_numpy(np.where(valid, data.actions[idx].astype(np.int64) + 1, 0))
    if data.times is not None:
        starts = data.offsets[:-1][users]
        batch.times = torch.from_numpy(time_codes(data.times, idx, valid, starts, known_end))
    batch.user_features = user_feature_codes(data, users)


class TrainBatches:
    """Vectorised training batches: left-padded inputs and next-item positives (and, with a `sampler`,
    one negative per real position drawn outside the user's training history).

    Each batch is trimmed to its longest real sequence, and users are bucketed by length
    (sorted within windows of `bucket_batches` batches, then batch order shuffled), so the
    compute follows the number of real interactions, not users x maxlen.

    Under DDP (`world` ranks) each step takes `world` neighbouring batches of that sorted order, one per
    rank, so ranks get sequences of similar length and wait little for each other; the epoch's
    remainder of fewer than `world` batches is left out (a different one every epoch).
    """

    def __init__(self, split: "LeaveOneOut", maxlen, batch_size, bucket_batches=32, rank=0, world=1, sampler=None,
                 target_weights=None):
        self.split, self.maxlen, self.batch_size, self.bucket_batches = split, maxlen, batch_size, bucket_batches
        self.rank, self.world, self.sampler = rank, world, sampler
        # (max action + 1,) loss weight of a target by its action (0: not a target); None: every target 1
        self.target_weights = target_weights if split.data.actions is not None else None
        self.users = np.flatnonzero(split.train_lengths >= 2)  # need at least one (input, next) pair
        self.seq_lengths = np.minimum(split.train_lengths - 1, maxlen)
        # users none of whose trained positions has a target (e.g. exposures only) would make empty batches
        has_target = self.has_target(self.users)
        self.users_without_target = int((~has_target).sum())
        self.users = self.users[has_target]
        # trained positions per batch over an epoch: what --loss_reduction position divides a batch's sum by
        self.mean_rows = float(self.seq_lengths[self.users].sum()) / max(1, -(-len(self.users) // batch_size))

    def has_target(self, users):
        """Whether each user's trained positions (the last seq_lengths of its training part) hold a target of
        weight > 0; always true without target weights."""
        if self.target_weights is None:
            return np.ones(len(users), bool)
        is_target = np.concatenate([[0], np.cumsum(self.target_weights[self.split.data.actions] > 0)])
        ends = self.split.starts[users] + self.split.train_lengths[users]
        return is_target[ends] - is_target[ends - self.seq_lengths[users]] > 0

    def __len__(self):
        """Steps per epoch (batches per rank)."""
        return -(-len(self.users) // self.batch_size) // self.world

    def epoch(self, rng):
        """This rank's batches of one epoch; every rank draws the same users and order from `rng`."""
        users = rng.permutation(self.users)
        if self.bucket_batches > 1:
            window = self.batch_size * self.bucket_batches
            for s in range(0, len(users), window):
                chunk = users[s:s + window]
                users[s:s + window] = chunk[np.argsort(-self.seq_lengths[chunk], kind="stable")]
        batches = [users[s:s + self.batch_size] for s in range(0, len(users), self.batch_size)]
        order = rng.permutation(len(self))
        if self.world > 1:  # each rank its own negatives (the shared rng has given every rank the same order)
            rng = rng.spawn(self.world)[self.rank]
        for step in order:
            yield self.make_batch(batches[step * self.world + self.rank], rng)

    def make_batch(self, users, rng):
        split, data = self.split, self.split.data
        lengths = self.seq_lengths[users]
        width = int(lengths.max())
        ends = split.starts[users] + split.train_lengths[users]
        idx, valid = event_index(ends - 1, lengths, width)
        seq = np.where(valid, data.items[idx], 0).astype(np.int64)
        pos = np.where(valid, data.items[idx + 1], 0).astype(np.int64)
        neg = None
        if self.sampler is not None:
            neg = torch.from_numpy(self.sampler.draw_host(users, (width,), rng, where=pos != 0))
        weights = None
        if self.target_weights is not None:  # by the target's action; weight 0 leaves the position out
            weights = np.where(valid, self.target_weights[data.actions[idx + 1]], 0)
            rows = np.flatnonzero(weights > 0)
            weights = torch.from_numpy(weights.ravel()[rows].astype(np.float32))
        else:
            rows = np.flatnonzero(pos != 0)
        batch = Batch(torch.from_numpy(seq), torch.from_numpy(pos), torch.from_numpy(users), torch.from_numpy(rows),
                      neg, weights=weights)
        add_context(batch, data, users, idx, valid, ends + 1)
        if batch.times is not None:  # inference may not know the prediction time: "none" must be a code it learnt
            unknown = torch.from_numpy(rng.random(seq.shape) < UNKNOWN_PREDICTION_TIME) & (batch.inputs != 0)
            batch.times[..., 1].masked_fill_(unknown, 1)
        return batch
