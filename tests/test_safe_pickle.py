import os
import pickle
import pickletools

import numpy as np
import pytest

from readers import safe_pickle
from readers.safe_pickle import UnsafePickleError

PROTOCOLS = [2, 3, 4, 5]


class WritesMarker:
    """Unpickling this with plain pickle would create the marker file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class RunsCommand:
    def __reduce__(self):
        return (os.system, ("echo hacked",))


def assert_same_arrays(got, expected):
    assert got.keys() == expected.keys()
    for key, array in expected.items():
        assert type(got[key]) is np.ndarray
        assert got[key].dtype == array.dtype
        np.testing.assert_array_equal(got[key], array)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_indexer_round_trip(tmp_path, protocol):
    indexer = {
        "u": {"user_1": 1, "user_2": np.int64(2)},
        "i": {20005: 1, 20006: np.int64(2), 20007: np.int32(3)},
        "f": {"100": {7: 1, "x": np.int64(2)}, "101": {}},
    }
    path = tmp_path / "indexer.pkl"
    path.write_bytes(pickle.dumps(indexer, protocol=protocol))
    got = safe_pickle.load(str(path))
    assert got == indexer
    assert type(got["u"]["user_1"]) is int
    assert type(got["i"][20006]) is np.int64 and type(got["i"][20007]) is np.int32


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_seq_offsets_round_trip(protocol):
    offsets = [0, 17, 2**40, np.int64(99)]
    got = safe_pickle.loads(pickle.dumps(offsets, protocol=protocol))
    assert got == offsets and type(got[3]) is np.int64
    assert safe_pickle.loads(pickle.dumps({1: 0, 2: 17}, protocol=protocol)) == {1: 0, 2: 17}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_arrays_round_trip(tmp_path, protocol):
    rng = np.random.default_rng(0)
    embeddings = {creative: rng.standard_normal(32).astype(np.float32) for creative in (5, 6, 7)}
    embeddings.update({
        "fortran": np.asfortranarray(rng.standard_normal((3, 4))),
        "big_endian": np.arange(6, dtype=">f4").reshape(2, 3),
        "empty": np.zeros((0, 32), dtype=np.float32),
        "ints": np.arange(5, dtype=np.uint16),
        "text": np.array(["ab", "c"]),
    })
    path = tmp_path / "emb_81_32.pkl"
    path.write_bytes(pickle.dumps(embeddings, protocol=protocol))
    got = safe_pickle.load(str(path))
    assert_same_arrays(got, embeddings)
    assert got["fortran"].flags.f_contiguous
    assert got["big_endian"].dtype.byteorder == ">"
    got[5][0] = 1.0  # arrays are ordinary writable numpy arrays


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_nested_containers_and_bare_dtype(protocol):
    array = np.ones(3, dtype=np.float32)
    obj = {"pair": (array, np.dtype(">i8")), "list": [array, {"s": "t"}], "same": array}
    got = safe_pickle.loads(pickle.dumps(obj, protocol=protocol))
    assert type(got["pair"]) is tuple and got["pair"][1] == np.dtype(">i8")
    np.testing.assert_array_equal(got["pair"][0], array)
    assert got["pair"][0] is got["list"][0] is got["same"]  # sharing survives


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_sets_need_protocol_4(protocol):
    obj = {"s": {1, 2}, "f": frozenset({3})}
    if protocol >= 4:  # protocol 2 and 3 write sets as a call of the builtins.set global
        assert safe_pickle.loads(pickle.dumps(obj, protocol=protocol)) == obj
    else:
        with pytest.raises(UnsafePickleError, match=r"builtins\.(set|frozenset)"):
            safe_pickle.loads(pickle.dumps(obj, protocol=protocol))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_global_with_side_effect_is_refused_and_never_runs(tmp_path, protocol):
    marker = tmp_path / "hacked"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ok": 1, "evil": WritesMarker(str(marker))}, protocol=protocol))
    with pytest.raises(UnsafePickleError, match=r"refused pickle global io\.open") as info:
        safe_pickle.load(str(path))
    assert str(info.value).startswith(f"{path}: ")
    assert not marker.exists()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_os_system_is_refused(protocol):
    name = f"{os.system.__module__}.system"  # posix.system on Linux
    for payload in (os.system, RunsCommand()):
        with pytest.raises(UnsafePickleError, match=name.replace(".", r"\.")):
            safe_pickle.loads(pickle.dumps(payload, protocol=protocol))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_other_globals_are_refused(protocol):
    for payload in (set, np.load, np.ma.masked_array([1, 2]), np.dtype([("a", "i4")])):
        with pytest.raises(UnsafePickleError):
            safe_pickle.loads(pickle.dumps(payload, protocol=protocol))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_object_array_is_refused(protocol):
    payload = pickle.dumps({"a": np.array([1, "x", None], dtype=object)}, protocol=protocol)
    with pytest.raises(UnsafePickleError, match="numpy dtype 'O8'"):
        safe_pickle.loads(payload)


class ForgedArray:
    """Pickles as numpy's own protocol <= 4 array, but with a list as the data (as object arrays are)."""

    def __reduce__(self):
        reconstruct, args, _ = np.zeros(1).__reduce__()
        return (reconstruct, args, (1, (2,), np.dtype("f8"), False, [1, 2]))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_array_data_that_is_a_list_is_refused(protocol):
    with pytest.raises(UnsafePickleError, match="numpy array data of type list"):
        safe_pickle.loads(pickle.dumps(ForgedArray(), protocol=protocol))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_truncated_file_names_the_path(tmp_path, protocol):
    data = pickle.dumps({"a": np.arange(10, dtype=np.float32), "b": list(range(100))}, protocol=protocol)
    path = tmp_path / "truncated.pkl"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"^{path}: corrupt or truncated pickle") as info:
        safe_pickle.load(str(path))
    assert not isinstance(info.value, UnsafePickleError)


def test_garbage_and_empty_files(tmp_path):
    for name, data in (("empty.pkl", b""), ("garbage.pkl", b"not a pickle at all")):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ValueError, match=f"^{path}: "):
            safe_pickle.load(str(path))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_numpy_1x_module_names(protocol):
    """numpy 1.x writes numpy.core.* where numpy 2.x writes numpy._core.*; both are read."""
    obj = {"v": np.arange(4, dtype=np.float32), "n": np.int64(7)}
    data = pickle.dumps(obj, protocol=protocol)
    renamed = ((b"numpy._core.multiarray", b"numpy.core.multiarray"), (b"numpy._core.numeric", b"numpy.core.numeric"))
    for new, old in renamed:
        if protocol >= 4:  # SHORT_BINUNICODE carries the length in the byte before the text
            new, old = bytes([len(new)]) + new, bytes([len(old)]) + old
        data = data.replace(new, old)
    data = pickletools.optimize(data)  # rewrites the protocol 4 frame lengths
    assert b"numpy.core." in data and b"numpy._core" not in data
    got = safe_pickle.loads(data)
    np.testing.assert_array_equal(got["v"], obj["v"])
    assert got["n"] == 7 and type(got["n"]) is np.int64
