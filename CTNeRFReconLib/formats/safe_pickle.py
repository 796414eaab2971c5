"""Loading pickles without letting them run code.

A pickle names the callables that rebuild its objects, and the standard unpickler calls whatever
it names (``os.system`` included). This unpickler resolves only the few names numpy arrays,
numpy scalars and dtypes need; plain containers, numbers and strings need no names at all.
Any other name is refused before anything is called.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

from .validate import ScanFormatError

_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1')
}


class RefusedPickleError(ScanFormatError):
    """The pickle names something other than numpy arrays and plain data."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, fh, path):
        super().__init__(fh)
        self._path = path

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise RefusedPickleError(
            self._path, f"{module}.{name}",
            "the pickle asks to call a function or build an object other than numpy arrays and plain "
            "data; it was refused and nothing was executed",
            "only load pickles from sources you trust; re-save the data as numpy arrays, lists and dicts")

    def persistent_load(self, pid):
        raise RefusedPickleError(self._path, "persistent_id", "persistent references are not allowed",
                                 "re-save the data as plain arrays and dicts")


def _check_plain(obj, path, where="data", depth=0):
    if depth > 50:
        raise ScanFormatError(path, where, "nesting is too deep", "store a flat dict of arrays")
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            raise ScanFormatError(path, where, "object arrays are not accepted", "store numeric arrays")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(v, path, f"{where}.{k}", depth + 1)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, path, f"{where}[{i}]", depth + 1)


def safe_load(path) -> object:
    """Unpickle ``path`` admitting only numpy arrays, numbers, strings, bytes, lists, tuples, dicts."""
    path = Path(path)
    data = path.read_bytes()
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), path).load()
    except ScanFormatError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            MemoryError, UnicodeDecodeError) as exc:
        raise ScanFormatError(path, "pickle", f"cannot be read ({type(exc).__name__}: {exc})",
                              "the file is truncated or not a pickle; copy it again") from None
    _check_plain(obj, path)
    return obj
