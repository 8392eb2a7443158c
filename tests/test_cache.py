"""The parse cache's checks (sizes, dtypes, shapes and the manifest on every load; SHA-256 on request and after
writing), and the data errors that name a byte: a non-UTF-8 byte's position, a failed cache write."""
import hashlib
import json
import os

import numpy as np
import pytest

import taac_synthetic
from config import build_config
from conftest import write
from dataset import DataError
from readers import cache, taac
from readers.cache import CACHE_VERSION, file_digest, read_cache
from readers.logs import load_interactions

LOG = "1 5 3 4 1 2\n2 2 3\n3 4 4 1 5\n4 1 2\n"


def cached_log(tmp_path):
    """(log path, cache dir, the cache folder) of a log loaded once through a cache."""
    path, cache = write(tmp_path, "log.txt", LOG), str(tmp_path / "cache")
    load_interactions(path, cache_dir=cache, id_type="int")
    (folder,) = os.listdir(cache)
    return path, cache, os.path.join(cache, folder)


def data_offset(npy):
    """Byte offset of an .npy file's array data (after its header)."""
    with open(npy, "rb") as f:
        version = np.lib.format.read_magic(f)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        header(f)
        return f.tell()


def overwrite(npy, offset, data):
    with open(npy, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_manifest_records_each_array_and_its_own_checksum(tmp_path):
    _, _, folder = cached_log(tmp_path)
    with open(os.path.join(folder, "manifest.json")) as f:
        manifest = json.load(f)
    assert CACHE_VERSION >= 5 and set(manifest) >= {"arrays", "meta", "checksum"}
    assert list(manifest["arrays"]) == list(cache.CACHE_ARRAYS)
    for name, entry in manifest["arrays"].items():
        npy = os.path.join(folder, f"{name}.npy")
        array = np.load(npy, mmap_mode="r")
        assert entry == {"dtype": array.dtype.str, "shape": list(array.shape), "bytes": os.path.getsize(npy),
                         "sha256": file_digest(npy)}


def test_same_size_bytes_are_caught_only_when_verifying(tmp_path, capsys):
    path, cache, folder = cached_log(tmp_path)
    fresh = load_interactions(path, id_type="int")
    npy = os.path.join(folder, "items.npy")
    overwrite(npy, data_offset(npy), np.array([2], np.int32).tobytes())  # item 5 -> 2: in range, same size
    served = load_interactions(path, cache_dir=cache, id_type="int")
    assert served.items[0] == 2 and "damaged" not in capsys.readouterr().out  # the cheap checks cannot see it
    checked = load_interactions(path, cache_dir=cache, id_type="int", verify_cache=True)
    out = capsys.readouterr().out
    assert "ignoring the damaged data cache" in out and "items.npy" in out and "SHA-256" in out
    np.testing.assert_array_equal(checked.items, fresh.items)
    again = load_interactions(path, cache_dir=cache, id_type="int", verify_cache=True)  # rebuilt, and it verifies
    assert isinstance(again.items, np.memmap) and "damaged" not in capsys.readouterr().out
    np.testing.assert_array_equal(again.items, fresh.items)


def append_bytes(folder):
    with open(os.path.join(folder, "items.npy"), "ab") as f:
        f.write(b"\0" * 8)


def truncate(folder):
    npy = os.path.join(folder, "items.npy")
    os.truncate(npy, os.path.getsize(npy) - 4)


def header_dtype(folder):  # same size, same values: only the header's dtype differs
    npy = os.path.join(folder, "items.npy")
    with open(npy, "rb") as f:
        head = f.read(data_offset(npy))
    overwrite(npy, 0, head.replace(b"'<i4'", b"'<u4'"))


def header_shape(folder):  # a shorter array read from a file of the same size
    npy = os.path.join(folder, "offsets.npy")
    with open(npy, "rb") as f:
        head = f.read(data_offset(npy))
    overwrite(npy, 0, head.replace(b"(5,)", b"(4,)"))


def edit_manifest(folder, edit):
    path = os.path.join(folder, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    edit(manifest)
    with open(path, "w") as f:
        json.dump(manifest, f)


def manifest_edited(folder):
    edit_manifest(folder, lambda m: m["arrays"]["items"].update(shape=[3]))


def manifest_unsigned(folder):
    edit_manifest(folder, lambda m: m.pop("checksum"))


def array_missing(folder):
    os.remove(os.path.join(folder, "history.npy"))


@pytest.mark.parametrize("damage, reason", [(append_bytes, "items.npy: 188 bytes, the manifest records 180"),
                                            (truncate, "items.npy: 176 bytes, the manifest records 180"),
                                            (header_dtype, ("items.npy: dtype <u4 and shape (13,), the manifest "
                                                            "records <i4 and (13,)")),
                                            (header_shape, ("offsets.npy: dtype <i8 and shape (4,), the manifest "
                                                            "records <i8 and (5,)")),
                                            (manifest_edited, "manifest.json does not match its checksum"),
                                            (manifest_unsigned, "manifest.json does not match its checksum"),
                                            (array_missing, "history.npy")])
def test_damage_the_cheap_checks_see_is_caught_on_every_load(tmp_path, capsys, damage, reason):
    path, cache, folder = cached_log(tmp_path)
    damage(folder)
    data = load_interactions(path, cache_dir=cache, id_type="int")
    out = capsys.readouterr().out
    assert f"ignoring the damaged data cache {folder}" in out and reason in out, out
    np.testing.assert_array_equal(data.items, load_interactions(path, id_type="int").items)
    assert isinstance(load_interactions(path, cache_dir=cache, id_type="int").items, np.memmap)  # rebuilt


def test_a_cache_of_the_previous_format_is_damaged_not_misread(tmp_path, capsys):
    folder = tmp_path / "old"
    folder.mkdir()
    np.save(folder / "items.npy", np.arange(3))
    (folder / "manifest.json").write_text(json.dumps({"arrays": ["items"], "meta": None}))
    assert read_cache(str(folder)) is None and "damaged" in capsys.readouterr().out
    assert not folder.exists()


def test_a_cache_that_reads_back_differently_is_not_kept(tmp_path, monkeypatch, capsys):
    real_fsync = os.fsync

    def corrupting_fsync(fd):  # the bytes on disk are not the bytes written
        if os.readlink(f"/proc/self/fd/{fd}").endswith("items.npy"):
            os.pwrite(fd, b"\xff", 128)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", corrupting_fsync)
    path, cache = write(tmp_path, "log.txt", LOG), str(tmp_path / "cache")
    data = load_interactions(path, cache_dir=cache, id_type="int")
    out = capsys.readouterr().out
    assert "warning: the data cache" in out and "items.npy read back differently" in out, out
    assert os.listdir(cache) == []  # nothing kept, no temporary folder left
    np.testing.assert_array_equal(data.items, load_interactions(path, id_type="int").items)


def test_a_failed_cache_write_without_errno_says_why(tmp_path, monkeypatch, capsys):
    def full_disk(*args, **kwargs):
        raise OSError("No space left on device")  # no errno: strerror is None

    monkeypatch.setattr(np, "save", full_disk)
    path = write(tmp_path, "log.txt", LOG)
    load_interactions(path, cache_dir=str(tmp_path / "cache"))
    out = capsys.readouterr().out
    assert "cannot write the data cache" in out and "(No space left on device)" in out and "(None)" not in out


def test_verify_cache_is_a_flag_that_reaches_the_loaders(tmp_path, capsys):
    from training.run import load_data
    path, cache, folder = cached_log(tmp_path)
    npy = os.path.join(folder, "items.npy")
    overwrite(npy, data_offset(npy), np.array([2], np.int32).tobytes())
    flags = ["--data", path, "--cache_dir", cache, "--id_type", "int", "--single_item_users", "ignore"]
    assert build_config(flags).data.verify_cache is False
    load_data(build_config(flags))
    assert "damaged" not in capsys.readouterr().out
    load_data(build_config(flags + ["--verify_cache"]))
    assert "ignoring the damaged data cache" in capsys.readouterr().out


def test_competition_folder_caches_verify_too(tmp_path, capsys):
    log = taac_synthetic.generate(60, 40, seed=1, mm_ids=("81",))
    folder, cache = str(tmp_path / "parquet"), str(tmp_path / "cache")
    taac_synthetic.write_parquet_layout(folder, log)
    first = taac.load_taac(folder, cache, ["81"])
    (entry,) = os.listdir(cache)
    npy = os.path.join(cache, entry, "times.npy")
    overwrite(npy, data_offset(npy), np.array([7], np.int64).tobytes())
    assert taac.load_taac(folder, cache, ["81"]).times[0] == 7
    checked = taac.load_taac(folder, cache, ["81"], verify_cache=True)
    assert "ignoring the damaged data cache" in capsys.readouterr().out
    np.testing.assert_array_equal(checked.times, first.times)


def bad_byte_log(tmp_path, name, lines, bad_line):
    """(path, byte offset) of a log whose line `bad_line` holds a Windows-1252 quote (0x92) instead of 'x'."""
    rows = [line.encode() for line in lines]
    rows[bad_line - 1] = rows[bad_line - 1].replace(b"x", b"\x92", 1)
    raw = b"".join(row + b"\n" for row in rows)
    (tmp_path / name).write_bytes(raw)
    return str(tmp_path / name), raw.index(b"\x92")


@pytest.mark.parametrize("data_format", [None, "lines"])  # None: detect_format's first read meets it
def test_a_non_utf8_byte_is_named_by_its_file_offset_and_line_in_lines_logs(tmp_path, data_format):
    lines = [f"user{u} item{u} item{u + 1} item{u + 2}" for u in range(1999)]
    lines[1400] += " x"
    path, offset = bad_byte_log(tmp_path, "log.txt", lines, 1401)
    assert offset > 8192  # past the text reader's first decode chunk
    with pytest.raises(DataError) as e:
        load_interactions(path, data_format)
    assert str(e.value) == f"{path}:1401: not a UTF-8 text file (byte {offset}: invalid start byte)"


@pytest.mark.parametrize("data_format, header", [("pairs", ""), ("delimited", "user_id,item_id"),
                                                 (None, "user_id,item_id")])
def test_a_non_utf8_byte_is_named_by_its_file_offset_and_line_in_pandas_read_logs(tmp_path, data_format, header):
    sep = "," if header else " "
    lines = ([header] if header else []) + [f"{u % 5000}{sep}{u}" for u in range(60000)]
    lines[50000] += "x"
    path, offset = bad_byte_log(tmp_path, "log.csv", lines, 50001)
    assert offset > 1 << 19  # past pandas' first chunk
    with pytest.raises(DataError) as e:
        load_interactions(path, data_format)
    assert str(e.value) == f"{path}:50001: not a UTF-8 text file (byte {offset}: invalid start byte)"


def test_a_log_cut_inside_a_character_names_its_last_byte(tmp_path):
    path = tmp_path / "log.txt"
    path.write_bytes(b"1 a b\n2 c \xc3")  # the first byte of a two-byte character, then the end
    with pytest.raises(DataError) as e:
        load_interactions(str(path), "lines")
    assert str(e.value) == f"{path}:2: not a UTF-8 text file (byte 10: unexpected end of data)"


def test_manifest_checksum_is_over_the_canonical_manifest(tmp_path):
    _, _, folder = cached_log(tmp_path)
    with open(os.path.join(folder, "manifest.json")) as f:
        manifest = json.load(f)
    checksum = manifest.pop("checksum")
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    assert checksum == hashlib.sha256(canonical.encode()).hexdigest()
