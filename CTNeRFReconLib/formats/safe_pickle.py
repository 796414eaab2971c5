"""Loading pickles without letting them run code.

A pickle names the callables that rebuild its objects, and the standard unpickler calls whatever
it names (``os.system`` included). This unpickler resolves only the few names numpy arrays,
numpy scalars and dtypes need, and even those are not numpy's own functions but narrow stand-ins
that check their arguments: plain numeric (or fixed-width string) dtypes only, always built as
private copies, and ``BUILD`` (``__setstate__``) only on those dtypes and arrays, with a state that
must be the plain one. Without that, a pickle naming nothing but ``numpy.dtype`` could rewrite
numpy's shared float32 descriptor for the whole process. Plain containers, numbers and strings
need no names at all. Any other name is refused before anything is called, and a file that is
merely broken (truncated, corrupted) is reported as such; nothing escapes as a traceback.
"""
from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path

import numpy as np

from .validate import ScanFormatError

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
    from numpy._core.multiarray import scalar as _np_scalar
    from numpy._core.numeric import _frombuffer as _np_frombuffer
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct
    from numpy.core.multiarray import scalar as _np_scalar
    from numpy.core.numeric import _frombuffer as _np_frombuffer

_MULTIARRAY = ("numpy.core.multiarray", "numpy._core.multiarray")
_NUMERIC = ("numpy.core.numeric", "numpy._core.numeric")
_DTYPE_KINDS = "biufcSU"
"""bool, integers, floats, complex, fixed-width bytes and unicode: no objects, no records."""
_LATIN1 = ("latin1", "latin-1", "iso-8859-1", "iso8859-1")


class RefusedPickleError(ScanFormatError):
    """The pickle names something other than numpy arrays and plain data."""


class _Corrupt(Exception):
    """Malformed pickle content (reported as an unreadable file, not as a refused name)."""


class _NDArrayClass:
    """Stands for ``numpy.ndarray`` in a pickle: usable only as ``_reconstruct``'s first argument."""

    def __repr__(self):
        return "numpy.ndarray"


_NDARRAY = _NDArrayClass()
_PLAIN_LEAVES = (bool, int, float, complex, str, bytes, type(None), np.generic, np.dtype)


class _RestrictedUnpickler(pickle._Unpickler):  # the Python implementation: BUILD can be checked
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, fh, path, limit: int = 1 << 62):
        super().__init__(fh)
        self._path = path
        self._limit = limit  # no object can hold more bytes than the file
        self._dtypes: dict[int, tuple] = {}   # id -> plain state of every dtype this pickle made
        self._keep: list[np.dtype] = []       # keeps those ids from being reused

    # -- names -------------------------------------------------------------------------------------
    def _refuse(self, name: str, problem: str | None = None):
        return RefusedPickleError(
            self._path, name,
            problem or "the pickle asks to call a function or build an object other than numpy arrays and "
            "plain data; it was refused and nothing was executed",
            "only load pickles from sources you trust; re-save the data as numpy arrays, lists and dicts")

    def find_class(self, module, name):
        key = (module, name)
        if key == ("numpy", "ndarray"):
            return _NDARRAY
        if key == ("numpy", "dtype"):
            return self._dtype
        if module in _MULTIARRAY and name == "_reconstruct":
            return self._reconstruct
        if module in _MULTIARRAY and name == "scalar":
            return self._scalar
        if module in _NUMERIC and name == "_frombuffer":
            return self._frombuffer
        if key == ("_codecs", "encode"):  # protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1')
            return self._encode
        if module in ("builtins", "__builtin__") and name == "bytes":  # ... and b"" as bytes()
            return self._empty_bytes
        raise self._refuse(f"{module}.{name}")

    def persistent_load(self, pid):
        raise self._refuse("persistent_id", "persistent references are not allowed; nothing was executed")

    # -- the stand-ins -----------------------------------------------------------------------------
    def _dtype(self, spec, align=False, copy=False, *rest):
        if not isinstance(spec, str) or len(spec) > 16 or rest:
            raise _Corrupt(f"numpy.dtype called with {spec!r:.40}")
        try:
            plain = np.dtype(spec)
        except (TypeError, ValueError):
            raise _Corrupt(f"numpy.dtype({spec!r:.40}) is not a dtype") from None
        if plain.kind not in _DTYPE_KINDS or plain.fields is not None or plain.subdtype is not None:
            raise self._refuse(f"numpy.dtype('{spec}')", f"asks for a numpy dtype '{spec}' that is not plain "
                               "numbers or strings (objects and records are refused); nothing was executed")
        dt = np.dtype(spec, copy=True)  # a private copy: never numpy's shared descriptor
        self._dtypes[id(dt)] = dt.__reduce__()[2]
        self._keep.append(dt)
        return dt

    def _own_dtype(self, dt) -> np.dtype:
        if not isinstance(dt, np.dtype) or id(dt) not in self._dtypes:
            raise _Corrupt("an array or scalar without a dtype of its own")
        return dt

    def _reconstruct(self, cls, shape, typecode):
        if cls is not _NDARRAY:
            raise self._refuse(f"_reconstruct({cls!r:.40})")
        if not (isinstance(shape, tuple) and all(type(s) is int and 0 <= s <= 1 for s in shape)):
            raise _Corrupt("_reconstruct with an unexpected shape")
        if not isinstance(typecode, bytes) or len(typecode) != 1:
            raise _Corrupt("_reconstruct with an unexpected type code")
        return _np_reconstruct(np.ndarray, shape, typecode)

    def _scalar(self, dtype, data):
        dtype = self._own_dtype(dtype)
        if not isinstance(data, bytes) or len(data) != dtype.itemsize:
            raise _Corrupt("a numpy scalar whose bytes do not match its dtype")
        return _np_scalar(dtype, data)

    def _frombuffer(self, buf, dtype, shape, order, axis_order=None):
        dtype = self._own_dtype(dtype)
        if not isinstance(buf, (bytes, bytearray, pickle.PickleBuffer)):
            raise _Corrupt("_frombuffer without a byte buffer")
        if not (isinstance(shape, tuple) and all(type(s) is int and s >= 0 for s in shape)) or order not in "CFK":
            raise _Corrupt("_frombuffer with an unexpected shape or order")
        if axis_order is not None and not (isinstance(axis_order, tuple)
                                           and sorted(axis_order) == list(range(len(shape)))):
            raise _Corrupt("_frombuffer with an unexpected axis order")
        if axis_order is None:
            return _np_frombuffer(buf, dtype, shape, order)
        return _np_frombuffer(buf, dtype, shape, order, axis_order)

    def _encode(self, text, encoding="utf-8", *rest):
        if not isinstance(text, str) or not isinstance(encoding, str) or encoding.lower() not in _LATIN1 or rest:
            raise self._refuse("_codecs.encode", "asks to encode text other than as latin-1 bytes; nothing was "
                               "executed")
        return text.encode("latin-1")

    def _empty_bytes(self, *args):
        if args:
            raise self._refuse("builtins.bytes", "asks to build bytes from arguments; nothing was executed")
        return b""

    # -- BUILD (__setstate__): only plain dtypes and arrays, with plain states ---------------------
    def _load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, np.dtype):
            plain = self._dtypes.get(id(inst))
            if (plain is None or not isinstance(state, tuple) or len(state) != len(plain)
                    or state[0] != plain[0] or state[1] not in ("<", ">", "|", "=") or state[2:] != plain[2:]):
                raise self._refuse("numpy.dtype.__setstate__", "sets a numpy dtype's internal state to other than "
                                   "a plain number or string type; nothing was executed")
            inst.__setstate__(state)
        elif type(inst) is np.ndarray:
            if not isinstance(state, tuple) or len(state) not in (4, 5):
                raise _Corrupt("an array with a malformed state")
            shape, dtype, fortran, raw = state[-4:]
            self._own_dtype(dtype)
            if not (isinstance(shape, tuple) and all(type(s) is int and s >= 0 for s in shape)):
                raise _Corrupt("an array with a malformed shape")
            if not isinstance(raw, (bytes, bytearray)) or not isinstance(fortran, (bool, int)):
                raise self._refuse("numpy.ndarray.__setstate__", "holds an array of Python objects; nothing was "
                                   "executed")
            inst.__setstate__(state)
        else:
            raise self._refuse(f"{type(inst).__name__}.__setstate__")

    dispatch[pickle.BUILD[0]] = _load_build

    # -- BYTEARRAY8 allocates the length it announces before reading: bound it by the file ---------
    def _load_bytearray8(self):
        raw = self.read(8)
        if len(raw) != 8:
            raise _Corrupt("the data end early")
        (n,) = struct.unpack("<Q", raw)
        if n > self._limit:
            raise _Corrupt(f"a byte array of {n} bytes announced in a file of {self._limit} bytes")
        b = bytearray(n)
        if self.readinto(b) != n:
            raise _Corrupt("the data end early")
        self.append(b)

    dispatch[pickle.BYTEARRAY8[0]] = _load_bytearray8


MAX_NODES = 2_000_000
"""Containers and leaves a pickle may hold, counted with repeats: a pickle can reference one list
from many places (its memo), so a few bytes can stand for a structure too large to walk or convert."""


def _check_plain(obj, path, where="data", depth=0, budget=None):
    if budget is None:
        budget = [MAX_NODES]
    budget[0] -= 1
    if budget[0] < 0:
        raise ScanFormatError(path, where, f"holds more than {MAX_NODES} values and containers (counting shared "
                              "references), far more than any scan's fields", "store the projections as numpy arrays")
    if depth > 50:
        raise ScanFormatError(path, where, "nesting is too deep", "store a flat dict of arrays")
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in _DTYPE_KINDS:
            raise ScanFormatError(path, where, f"arrays of {obj.dtype} are not accepted", "store numeric arrays")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, path, f"{where}.<key>", depth + 1, budget)
            _check_plain(v, path, f"{where}.{str(k)[:40]}", depth + 1, budget)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for i, v in enumerate(obj):
            _check_plain(v, path, f"{where}[{i}]", depth + 1, budget)
    elif not isinstance(obj, _PLAIN_LEAVES):
        raise ScanFormatError(path, where, f"holds a {type(obj).__name__!r}, not plain data",
                              "store numpy arrays, numbers, strings, lists and dicts only")


def safe_load(path) -> object:
    """Unpickle ``path`` admitting only numpy arrays, numbers, strings, bytes, lists, tuples, dicts."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ScanFormatError(path, "file", f"cannot be read ({exc.strerror or exc})",
                              "check that the file exists and that you may read it") from None
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), path, limit=len(data)).load()
    except ScanFormatError:
        raise
    except Exception as exc:  # noqa: BLE001 - nothing the file names ran: any other failure is a broken file
        detail = str(exc)[:200] or ("the data end early" if isinstance(exc, EOFError) else "no detail")
        raise ScanFormatError(path, "pickle", f"cannot be read ({type(exc).__name__}: {detail})",
                              "the file is truncated, corrupt or not a pickle; copy it again") from None
    _check_plain(obj, path)
    return obj
