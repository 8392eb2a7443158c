"""Read the competition's pickled data files without letting them run code.

The TAAC 2025 data ships ``indexer.pkl``, ``seq_offsets.pkl`` and ``creative_emb/*.pkl``.
They are plain data (dicts, lists, ints, strings, numpy arrays), but ``pickle.load`` on a
file can call any importable function the file names, e.g. ``os.system``.  This module
never resolves a pickle global by name: the few globals numpy and ``pickle`` emit for
data map to our own small functions below, and any other global is refused with
:class:`UnsafePickleError`.  numpy dtypes and protocol <= 4 arrays are built through
placeholders (numpy's own ``__setstate__`` is never handed pickle-supplied state) and
swapped for real numpy objects after loading.
"""
import io
import pickle

import numpy as np

__all__ = ["UnsafePickleError", "load", "loads"]

_ALLOWED_KINDS = "biufcSU"  # bool, ints, floats, complex, bytes, str: no objects, structs or datetimes
_NDARRAY = object()  # stands for numpy.ndarray, which is only ever the first argument of _reconstruct


class UnsafePickleError(ValueError):
    """A pickle names a global (or a numpy dtype) that is not plain data."""


class _Refused(Exception):
    """Raised while unpickling; load() turns it into UnsafePickleError with the path."""


class _DtypeStub:
    """numpy.dtype(obj, align, copy) then BUILD(state): only simple, non-object dtypes."""
    __slots__ = ("dtype",)

    def __init__(self, obj, align=False, copy=True):
        if not isinstance(obj, str):
            raise _Refused(f"numpy dtype {obj!r}")
        dtype = np.dtype(obj)
        if dtype.kind not in _ALLOWED_KINDS:
            raise _Refused(f"numpy dtype {obj!r}")
        self.dtype = dtype

    def __setstate__(self, state):
        # state is (version, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata])
        if not isinstance(state, tuple) or len(state) < 8 or any(s is not None for s in state[2:5]):
            raise _Refused(f"numpy dtype state {state!r}")
        if state[1] in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(state[1])


class _ArrayStub:
    """numpy's _reconstruct(ndarray, (0,), b'b') then BUILD((version, shape, dtype, is_fortran, rawdata))."""
    __slots__ = ("array",)

    def __init__(self):
        self.array = None

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise ValueError(f"bad numpy array state of length {len(state)}")
        shape, dtype, is_fortran, rawdata = state[-4:]
        if not isinstance(rawdata, (bytes, bytearray)):  # a list here means an object array
            raise _Refused(f"numpy array data of type {type(rawdata).__name__}")
        order = "F" if is_fortran else "C"
        self.array = np.frombuffer(rawdata, _dtype(dtype)).reshape(shape, order=order).copy(order="K")


def _dtype(stub):
    if type(stub) is not _DtypeStub:
        raise ValueError(f"expected a numpy dtype, got {type(stub).__name__}")
    return stub.dtype


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, file):
        super().__init__(file)
        self.stubs = 0  # resolve() is skipped when nothing needs swapping
        # Bound methods, not module functions: a pickle's BUILD cannot setattr on them.
        reconstruct, frombuffer, scalar = self._reconstruct, self._frombuffer, self._scalar
        self.allowed = {
            ("numpy.core.multiarray", "_reconstruct"): reconstruct,  # numpy 1.x
            ("numpy._core.multiarray", "_reconstruct"): reconstruct,  # numpy 2.x
            ("numpy.core.numeric", "_frombuffer"): frombuffer,  # protocol 5 arrays
            ("numpy._core.numeric", "_frombuffer"): frombuffer,
            ("numpy.core.multiarray", "scalar"): scalar,  # numpy scalars, e.g. np.int64 ids
            ("numpy._core.multiarray", "scalar"): scalar,
            ("numpy", "ndarray"): _NDARRAY,
            ("numpy", "dtype"): self._new_dtype,
            ("_codecs", "encode"): self._encode,  # how protocol 2 writes bytes
            ("builtins", "bytes"): self._empty_bytes,  # how protocol 2 writes b''
        }

    def find_class(self, module, name):
        module = "builtins" if module == "__builtin__" else module  # Python 2 name, used by protocol 2
        found = self.allowed.get((module, name))
        if found is None:
            raise _Refused(f"pickle global {module}.{name}")
        return found

    def _new_dtype(self, obj, align=False, copy=True):
        self.stubs += 1
        return _DtypeStub(obj, align, copy)

    def _reconstruct(self, subtype, shape, typecode):
        if subtype is not _NDARRAY:
            raise ValueError("numpy _reconstruct of something other than numpy.ndarray")
        self.stubs += 1
        return _ArrayStub()

    def _frombuffer(self, buf, dtype, shape, order):
        if not isinstance(buf, (bytes, bytearray)) or order not in ("C", "F"):
            raise ValueError("bad numpy protocol 5 array")
        array = np.frombuffer(buf, _dtype(dtype)).reshape(shape, order=order)
        return array if isinstance(buf, bytearray) else array.copy(order="K")  # copy makes read-only bytes writable

    def _scalar(self, dtype, data):
        dtype = _dtype(dtype)
        if not isinstance(data, bytes) or len(data) != dtype.itemsize:
            raise ValueError("bad numpy scalar")
        return np.frombuffer(data, dtype)[0]

    def _encode(self, text, encoding):
        if not isinstance(text, str) or encoding != "latin1":
            raise ValueError("bad protocol 2 bytes")
        return text.encode("latin1")

    def _empty_bytes(self):
        return b""


_CONTAINERS = (dict, list, tuple, set, frozenset, _ArrayStub, _DtypeStub)


def _resolve(obj, memo):
    """Swap placeholders for numpy objects inside plain containers (in place where mutable)."""
    kind = type(obj)
    if kind is _ArrayStub:
        if obj.array is None:
            raise ValueError("numpy array without its state")
        return obj.array
    if kind is _DtypeStub:
        return obj.dtype
    if id(obj) in memo:  # shared or cyclic containers are walked once
        return memo[id(obj)][1]
    memo[id(obj)] = (obj, obj)  # holding obj keeps its id from being reused while walking
    if kind is dict:
        for key, value in obj.items():
            if type(value) in _CONTAINERS:
                obj[key] = _resolve(value, memo)
        if any(type(key) in _CONTAINERS for key in obj):  # only tuples or dtypes can be keys
            resolved = {_resolve(key, memo): value for key, value in obj.items()}
            obj.clear()
            obj.update(resolved)
    elif kind is list:
        for i, value in enumerate(obj):
            if type(value) in _CONTAINERS:
                obj[i] = _resolve(value, memo)
    elif kind in (tuple, set, frozenset):
        resolved = kind(_resolve(value, memo) for value in obj)
        if kind is set:
            obj.clear()
            obj.update(resolved)
        else:
            memo[id(obj)] = (obj, resolved)
            obj = resolved
    return obj


def _load(file, label):
    try:
        unpickler = _SafeUnpickler(file)
        obj = unpickler.load()
        return _resolve(obj, {}) if unpickler.stubs else obj
    except _Refused as refused:
        raise UnsafePickleError(
            f"{label}: refused {refused} (only plain containers, numbers, strings and numpy arrays are read)"
        ) from None
    # What a truncated or corrupt pickle raises (UnicodeDecodeError is a ValueError).
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, OverflowError, RecursionError) as error:
        raise ValueError(f"{label}: corrupt or truncated pickle ({type(error).__name__}: {error})") from error


def load(path):
    """The object pickled in the file at ``path``; UnsafePickleError if it is not plain data."""
    with open(path, "rb") as file:
        return _load(file, path)


def loads(data):
    """The object pickled in ``data`` (bytes); as load()."""
    return _load(io.BytesIO(data), "<bytes>")
