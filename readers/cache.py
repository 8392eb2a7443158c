"""The parse cache: a folder of .npy arrays and a manifest, written atomically and memory-mapped on load, so
a log is parsed once and later runs read only the pages a step touches (docs/reliability.md#caching)."""
import hashlib
import json
import os
import shutil
import tempfile

import numpy as np

from dataset import SPLITS, Interactions, LeaveOneOut
from files import remove_stale_temp_files

CACHE_VERSION = 6  # 2: canonical-integer ids ('007' stays a string); 3: a folder of .npy, memory-mapped; 4: manifest
# 5: the manifest records each array's dtype, shape, size and SHA-256, and its own checksum
# 6: delimited logs keep their time column (int64 seconds) as `times`
# (an --action_col's `actions`, int8, need no new version: its settings are in the key, and logs without it
# cache what they did)
CACHE_ARRAYS = ("offsets", "items", "user_ids", "item_ids", "history", "split_counts")


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_cache(cache_folder: str, verify: bool = False) -> tuple[dict, dict | None] | None:
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


def cache_arrays(data: Interactions) -> dict:
    """The arrays of `data` a cache keeps, with the split's derived ones (computed once, here)."""
    if data.history is None:
        split = LeaveOneOut(data)
        data.history, data.split_counts = split.history, np.stack([split.item_counts(w) for w in SPLITS])
    return {name: getattr(data, name) for name in CACHE_ARRAYS}


def write_cache(cache_folder: str, arrays: dict, meta: dict | None = None) -> None:
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
