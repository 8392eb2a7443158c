"""Interaction logs (lines | pairs | delimited) -> dataset.Interactions, through the parse cache; and the embedded
synthetic log. Raw ids are re-indexed to 1..N (0 is padding), users in order of their ids."""
import codecs
import hashlib
import itertools
import json
import os
import re

import numpy as np
import pandas as pd
from pandas.tseries.api import guess_datetime_format

from config import FORMATS, ID_TYPES
from dataset import DataError, Interactions
from readers.cache import CACHE_VERSION, cache_arrays, file_digest, read_cache, write_cache

USER_COLUMNS = ("user_id", "user", "userid", "uid", "visitorid", "customer_id")
ITEM_COLUMNS = ("item_id", "item", "itemid", "iid", "movie_id", "movieid", "product_id", "track_id")
TIME_COLUMNS = ("timestamp", "time", "ts", "datetime", "date", "event_time", "unix_time")


# ----------------------------------------------------------------------------- readers

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


def _group(users, items, order_key=None, seconds=None, actions=None):
    """Group interactions by user (stable, so file order or `order_key` is chronology); `seconds`: each row's
    time, kept in that order as Interactions.times; `actions`: each row's action type, as Interactions.actions."""
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
    return Interactions(offsets, items, user_ids, item_ids, times=None if seconds is None else seconds[order],
                        actions=None if actions is None else actions[order])


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


def read_delimited(path, user_col=None, item_col=None, time_col=None, id_type="auto", action_col=None,
                   action_threshold=None):
    """CSV / TSV / RecBole .inter with a header naming user, item and optional timestamp columns; `action_col`
    (never detected): action types 0..127, or numbers split at `action_threshold` into 1 (>=) and 0."""
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
    action = _pick_column(names, action_col, (), "action", path, required=False)
    columns = list(dict.fromkeys(c for c in (user, item, time, action) if c is not None))  # a column read once
    users, items = _IdColumn(path, "user", id_type), _IdColumn(path, "item", id_type)
    times = _TimeColumn(path, time) if time is not None else None
    actions = _ActionColumn(path, action, action_threshold) if action is not None else None
    for frame, lines in _read_chunks(path, "as many fields as the header", 2, sep=sep, header=0, keep=columns,
                                     described=f"values in columns {columns}"):
        users.add(frame[user].to_numpy(), lines)
        items.add(frame[item].to_numpy(), lines)
        if times:
            times.add(frame[time], lines)
        if actions:
            actions.add(frame[action], lines)
    return _group(users, items, times.keys() if times else None, times.seconds() if times else None,
                  actions.values() if actions else None)


class _ActionColumn:
    """An action column as int8 action types: integers 0..127 as they are, or, with a threshold, any finite
    number as 1 (>= threshold) or 0; a cell that does not fit is an error naming its line."""

    def __init__(self, path, column, threshold=None):
        self.path, self.column, self.threshold, self.parts = path, column, threshold, []

    def add(self, values, lines):
        numbers = pd.to_numeric(values, errors="coerce").to_numpy(np.float64)  # 'nan' / 'x' -> NaN: an error below
        finite = np.isfinite(numbers)
        if self.threshold is None:
            bad = ~(finite & (numbers == np.round(numbers)) & (numbers >= 0) & (numbers <= 127))
            expected = "an integer action type in 0..127 (or give --action_threshold to split a numeric column)"
        else:
            bad, expected = ~finite, f"a finite number (split at --action_threshold {self.threshold:g})"
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{self.path}:{lines[i]}: column '{self.column}' expected {expected}, "
                            f"got {values.iloc[i]!r}")
        if self.threshold is None:
            self.parts.append(numbers.astype(np.int8))
        else:
            self.parts.append((numbers >= self.threshold).astype(np.int8))

    def values(self) -> np.ndarray:
        """(rows,) int8 action types in file order."""
        return np.concatenate(self.parts)


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

    def seconds(self):
        """int64 seconds: a numeric column is read as seconds (rounded), dates from their nanoseconds."""
        keys = self.keys()
        return keys // 1_000_000_000 if self.dates else np.round(keys).astype(np.int64)


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


def detect_format(path: str) -> str:
    """Guess 'delimited' (header row), 'lines' (a line with 3+ fields) or 'pairs' (always 2 fields)."""
    with open(path, encoding="utf-8") as f:
        head = [line for line in itertools.islice(f, 2000) if line.strip()]
    if not head:
        raise DataError(f"{path}: file is empty")
    first = re.split(r"[\t,;\s]+", head[0].strip())
    if any(column_key(tok) in USER_COLUMNS + ITEM_COLUMNS for tok in first):
        return "delimited"
    if any(len(line.split()) > 2 for line in head):
        return "lines"
    return "pairs"


# ----------------------------------------------------------------------------- loading

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


def load_interactions(path: str, data_format: str | None = None, cache_dir: str | None = None,
                      user_col: str | None = None, item_col: str | None = None, time_col: str | None = None,
                      id_type="auto", synthetic_seed=0, verify_cache=False, action_col: str | None = None,
                      action_threshold: float | None = None):
    """Read a log (or make the synthetic one), using a cache keyed by the file's content hash
    (verify_cache: check every cached array's SHA-256, not only sizes and shapes; action_col, action_threshold:
    a delimited log's action types, see read_delimited)."""
    if path == "synthetic" and action_col is not None:
        raise DataError(f"--action_col {action_col}: the synthetic log has no columns (it is for delimited logs)")
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
        if action_col is not None and data_format != "delimited":
            raise DataError(f"{path}: --action_col {action_col} is for delimited logs (a header naming columns); "
                            f"this file is read as {data_format}")
        threshold = None if action_threshold is None else float(action_threshold)  # 4 and 4.0: one cache
        # appended only when set, so logs read without actions keep their fingerprints (and checkpoints)
        settings = json.dumps([file_digest(path), data_format, user_col, item_col, time_col, id_type]
                              + ([action_col, threshold] if action_col is not None else []))
        fingerprint = "sha256:" + hashlib.sha256(settings.encode()).hexdigest()
        cache_file = None
        if cache_dir:
            key = json.dumps([CACHE_VERSION, settings])
            stem = os.path.splitext(os.path.basename(path))[0]
            cache_file = os.path.join(cache_dir, f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}")
            if os.path.exists(cache_file):
                cached = read_cache(cache_file, verify_cache)
                if cached is not None:
                    data = Interactions(**cached[0])
                    data.fingerprint = fingerprint
                    return data
        if data_format == "lines":
            data = read_lines(path, id_type)
        elif data_format == "pairs":
            data = read_pairs(path, id_type)
        else:
            data = read_delimited(path, user_col, item_col, time_col, id_type, action_col, threshold)
    except UnicodeDecodeError as e:  # e.start counts from the reader's decode chunk: find the byte in the file
        offset, line, reason = first_non_utf8(path) or (e.start, None, e.reason)
        where = f"{path}:{line}" if line else path
        raise DataError(f"{where}: not a UTF-8 text file (byte {offset}: {reason})") from None
    if cache_file:
        write_cache(cache_file, {**cache_arrays(data), **{name: getattr(data, name) for name in ("times", "actions")
                                                          if getattr(data, name) is not None}})
    data.fingerprint = fingerprint
    return data


def make_synthetic(num_users: int = 4000, num_items: int = 3000, num_topics: int = 40, seed: int = 0) -> Interactions:
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
