"""GSLM / fairseq k-means files (``km.bin``): read their centroids safely, write compatible ones.

fairseq's ``simple_kmeans`` and textlesslib save a fitted scikit-learn ``MiniBatchKMeans``
with ``joblib.dump``: a pickle in which numpy arrays are ``NumpyArrayWrapper`` records
followed by the raw array bytes. Plain ``pickle.dump`` files and compressed joblib files
(gzip, zlib, bz2, xz/lzma) occur too. All are programs; :func:`read_centroids` never runs
them. Its unpickler resolves only a fixed set of names (an
:class:`~teal_cli.weights.safe_pickle.AllowList`, as torch checkpoints), each to something
inert here:

- numpy's array and dtype reconstruction (``_reconstruct``, ``_frombuffer``, ``ndarray``,
  ``dtype``, ``scalar``): real numpy constructors, which only build arrays from bytes;
- joblib's ``NumpyArrayWrapper``: read by the same rules joblib uses (alignment padding,
  C/Fortran order), object arrays refused;
- scikit-learn's ``KMeans`` / ``MiniBatchKMeans`` (any module path): :class:`EstimatorState`,
  an attribute bag that records the pickled state and has no behaviour;
- ``_codecs.encode(text, "latin1")``, which protocol-2 pickles use to spell bytes.

Anything else (``os.system``, ``builtins.eval``, other classes) raises :class:`CodecError`
before it is called. :func:`write_km` writes the opcodes of a ``MiniBatchKMeans`` pickle
by hand, so teal needs no scikit-learn, and ``joblib.load`` (or ``pickle.load``) in an
environment with scikit-learn returns a working estimator (``predict`` included).
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import pickle
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CodecError, first_line
from ..weights.safe_pickle import AllowList

if TYPE_CHECKING:
    import numpy as np
    import torch

_KMEANS_CLASSES = {"KMeans", "MiniBatchKMeans"}
_SKLEARN_MODULES = ("sklearn.cluster",)
_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric",
                  "numpy")


class EstimatorState:
    """What a pickled scikit-learn k-means estimator carried, as plain attributes."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.class_name = ""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise CodecError("k-means pickle: estimator state is not a dict")
        self.__dict__.update(state)


class _ArrayWrapper:
    """Stand-in for joblib's ``NumpyArrayWrapper``: holds its fields until BUILD reads the bytes."""

    def __setstate__(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise CodecError("k-means pickle: malformed joblib array record")
        self.__dict__.update(state)


def _new_object(cls, *args):
    """``copyreg._reconstructor`` / ``copyreg.__newobj__`` for our inert classes only."""
    if cls not in (EstimatorState, _ArrayWrapper):
        raise CodecError(f"k-means pickle: refusing to construct {cls!r}")
    return cls.__new__(cls)


def _kmeans_class(module: str, name: str) -> Any:
    return EstimatorState if module.startswith(_SKLEARN_MODULES) and name in _KMEANS_CLASSES else None


def _numpy_global(module: str, name: str) -> Any:
    import numpy as np

    if module in _NUMPY_MODULES:
        found = {"ndarray": np.ndarray, "dtype": np.dtype, "scalar": _numpy_scalar, "_frombuffer": _frombuffer}.get(name)
        return _numpy_reconstruct() if name == "_reconstruct" else found
    if module == "numpy.dtypes" and name.endswith("DType"):
        return _dtype_class(name)
    return None



def _refuse(module: str, name: str) -> CodecError:
    return CodecError(f"k-means pickle: refusing to load {module}.{name} (only numpy arrays and "
                      "scikit-learn KMeans state are read)")


class _SafeUnpickler(pickle._Unpickler):  # the pure-Python one: BUILD can be intercepted
    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        return _KM_PICKLES.resolve(module, name, _refuse)

    def load_build(self) -> None:
        stack = self.stack
        state = stack.pop()
        target = stack[-1]
        setstate = getattr(target, "__setstate__", None)
        import numpy as np

        if isinstance(target, (np.ndarray, np.dtype, EstimatorState, _ArrayWrapper)):
            setstate(state)
        else:
            raise CodecError(f"k-means pickle: refusing to set the state of a {type(target).__name__}")
        if isinstance(target, np.ndarray) and target.dtype.hasobject:
            raise CodecError("k-means pickle: object arrays are not read")
        if isinstance(target, _ArrayWrapper):
            stack[-1] = self._read_wrapped_array(target)

    dispatch[pickle.BUILD[0]] = load_build

    def _read_wrapped_array(self, wrapper: _ArrayWrapper):
        import numpy as np

        dtype = np.dtype(wrapper.dtype)
        if dtype.hasobject:
            raise CodecError("k-means pickle: object arrays are not read")
        shape = tuple(int(s) for s in wrapper.shape)
        if getattr(wrapper, "numpy_array_alignment_bytes", None) is not None:
            padding = self.read(1)[0]
            self.read(padding)
        count = 1
        for s in shape:
            count *= s
        data = self.read(count * dtype.itemsize)
        if len(data) != count * dtype.itemsize:
            raise CodecError("k-means pickle: truncated array data")
        array = np.frombuffer(data, dtype=dtype, count=count).copy()
        if getattr(wrapper, "order", "C") == "F":
            return array.reshape(shape[::-1]).transpose()
        return array.reshape(shape)


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise CodecError("k-means pickle: unexpected _codecs.encode call")
    return text.encode("latin1")


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _numpy_scalar(dtype, data=None):
    import numpy as np

    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise CodecError("k-means pickle: object scalars are not read")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _frombuffer(buffer, dtype, shape, order):
    import numpy as np

    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise CodecError("k-means pickle: object arrays are not read")
    array = np.frombuffer(bytes(buffer), dtype=dtype)
    return array.reshape(shape, order=order).copy()


def _dtype_class(name: str):
    import numpy as np

    def make(*args):
        raise CodecError(f"k-means pickle: numpy.dtypes.{name} is not supported")

    return getattr(getattr(np, "dtypes", None), name, make)


_KM_PICKLES = AllowList(
    exact={
        ("joblib.numpy_pickle", "NumpyArrayWrapper"): _ArrayWrapper,
        ("copyreg", "_reconstructor"): _new_object,
        ("copyreg", "__newobj__"): _new_object,
        ("_codecs", "encode"): _latin1_bytes,  # protocol < 3 writes bytes as encode(str, "latin1")
        **{("builtins", t.__name__): t for t in (object, bytearray, set, frozenset)},
    },
    rules=(_kmeans_class, _numpy_global),
)


def _decompress(data: bytes) -> bytes:
    if data.startswith(b"\x1f\x8b"):
        return gzip.decompress(data)
    if data.startswith(b"BZh"):
        return bz2.decompress(data)
    if data.startswith((b"\xfd7zXZ", b"\x5d\x00\x00")):
        return lzma.decompress(data)
    if data.startswith(b"ZF"):  # joblib < 0.9.3: "ZF" + 0x-padded length + zlib stream
        return zlib.decompress(data[2 + 19 :])
    if data[:1] == b"\x78":
        return zlib.decompress(data)
    return data


def read_estimator(path: str | Path) -> EstimatorState:
    """The state of a pickled / joblib-dumped scikit-learn k-means, without running the file."""
    path = Path(path)
    if not path.is_file():
        raise CodecError(f"{path}: k-means file not found" if not path.exists() else f"{path}: is a folder, expected a km.bin file")
    try:
        data = _decompress(path.read_bytes())
        obj = _SafeUnpickler(io.BytesIO(data)).load()
    except CodecError as exc:
        raise CodecError(f"{path}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - only teal's stand-ins run: any failure means a damaged file
        raise CodecError(f"{path}: not a k-means pickle, or a truncated/corrupt one ({first_line(exc, 120)})") from None
    if not isinstance(obj, EstimatorState) or not hasattr(obj, "cluster_centers_"):
        raise CodecError(f"{path}: no scikit-learn KMeans with cluster_centers_ in this file")
    return obj


def read_centroids(path: str | Path) -> "torch.Tensor":
    """``cluster_centers_`` of a fairseq/GSLM ``km.bin`` (or any sklearn KMeans pickle), ``[k, dim]`` float32."""
    import numpy as np
    import torch

    centers = np.asarray(read_estimator(path).cluster_centers_)
    if centers.ndim != 2 or not np.issubdtype(centers.dtype, np.floating):
        raise CodecError(f"{path}: cluster_centers_ has shape {centers.shape} and dtype {centers.dtype}, expected [k, dim] floats")
    return torch.from_numpy(centers.astype(np.float32, copy=True))


# ---------------------------------------------------------------- export


KM_CLASS = ("sklearn.cluster", "MiniBatchKMeans")
# What the written pickle refers to by name; each exists in scikit-learn 0.21 (the GSLM era)
# through current releases and in numpy 1.x and 2.x.
KM_GLOBALS = {KM_CLASS, ("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype")}


class _Writer:
    """Just enough of the pickle protocol (2) to describe an estimator holding arrays."""

    def __init__(self):
        self.out = io.BytesIO()
        self.out.write(pickle.PROTO + b"\x02")

    def op(self, code: bytes) -> None:
        self.out.write(code)

    def global_(self, module: str, name: str) -> None:
        self.out.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())

    def value(self, v: Any) -> None:
        import numpy as np

        if v is None:
            self.op(pickle.NONE)
        elif v is True or v is False:
            self.op(pickle.NEWTRUE if v else pickle.NEWFALSE)
        elif isinstance(v, int):
            self.op(pickle.LONG1 + bytes([8]) + struct.pack("<q", v))
        elif isinstance(v, float):
            self.op(pickle.BINFLOAT + struct.pack(">d", v))
        elif isinstance(v, str):
            raw = v.encode("utf-8")
            self.op(pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw)
        elif isinstance(v, bytes):
            self.op(pickle.SHORT_BINBYTES + bytes([len(v)]) + v if len(v) < 256
                    else pickle.BINBYTES + struct.pack("<I", len(v)) + v)
        elif isinstance(v, tuple):
            self.op(pickle.MARK)
            for item in v:
                self.value(item)
            self.op(pickle.TUPLE)
        elif isinstance(v, dict):
            self.op(pickle.EMPTY_DICT + pickle.MARK)
            for key, item in v.items():
                self.value(key)
                self.value(item)
            self.op(pickle.SETITEMS)
        elif isinstance(v, np.ndarray):
            self.array(v)
        else:
            raise TypeError(f"cannot write {type(v).__name__}")

    def dtype(self, dtype: "np.dtype") -> None:
        # numpy's own reduction of a simple dtype: dtype(str, False, True) then its 8-field state
        self.global_("numpy", "dtype")
        self.value((dtype.str[1:], False, True))
        self.op(pickle.REDUCE)
        self.value((3, dtype.str[0] if dtype.itemsize > 1 else "|", None, None, None, -1, -1, 0))
        self.op(pickle.BUILD)

    def array(self, a: "np.ndarray") -> None:
        import numpy as np

        a = np.ascontiguousarray(a)
        self.global_("numpy.core.multiarray", "_reconstruct")
        self.op(pickle.MARK)
        self.global_("numpy", "ndarray")
        self.value((0,))
        self.value(b"b")
        self.op(pickle.TUPLE + pickle.REDUCE)
        self.op(pickle.MARK)
        self.value(1)
        self.value(tuple(int(s) for s in a.shape))
        self.dtype(a.dtype)
        self.value(False)
        self.value(a.tobytes())
        self.op(pickle.TUPLE + pickle.BUILD)


def write_km(path: str | Path, centroids: "torch.Tensor | np.ndarray", *, seed: int | None = None,
             sklearn_version: str | None = None) -> Path:
    """Write ``centroids`` ([k, dim]) as a fairseq/GSLM ``km.bin``: a ``MiniBatchKMeans``
    pickle that ``joblib.load`` / ``pickle.load`` turn into a fitted estimator (atomically).

    Loads in scikit-learn 0.21 through current: protocol 2, only the names in
    ``KM_GLOBALS``, and the state that each version's ``predict`` reads (0.21:
    ``cluster_centers_``, ``batch_size``, ``verbose``; 1.x adds ``_n_threads`` and
    ``n_features_in_``), checked against the 0.21.3 source. 0.21's ``BaseEstimator.__setstate__``
    pops ``_sklearn_version`` and only warns when it differs from the running version.
    """
    import numpy as np

    centers = np.asarray(centroids.detach().cpu().numpy() if hasattr(centroids, "detach") else centroids, dtype=np.float32)
    if centers.ndim != 2:
        raise CodecError(f"centroids must be [k, dim], got shape {centers.shape}")
    k, dim = centers.shape
    state: dict[str, Any] = {
        # constructor parameters, as fairseq's learn_kmeans.py sets them
        "n_clusters": k, "init": "k-means++", "max_iter": 100, "batch_size": 10000, "verbose": 0,
        "compute_labels": False, "random_state": seed, "tol": 0.0, "max_no_improvement": 100,
        "init_size": None, "n_init": 20, "reassignment_ratio": 0.0,
        # fitted attributes predict() needs
        "cluster_centers_": centers, "n_features_in_": dim, "_n_threads": 1, "n_iter_": 0, "n_steps_": 0,
    }
    if sklearn_version is None:  # the installed version, if any: it silences sklearn's version warning
        try:
            from importlib.metadata import version

            sklearn_version = version("scikit-learn")
        except Exception:  # noqa: BLE001 - not installed
            sklearn_version = ""
    if sklearn_version:
        state["_sklearn_version"] = sklearn_version
    w = _Writer()
    # The public path: sklearn.cluster has exported MiniBatchKMeans in every release, while
    # the defining module moved (k_means_ up to 0.21, _kmeans from 0.22; 0.21 has no
    # _kmeans, so a file naming it does not load in GSLM-era environments).
    w.global_(*KM_CLASS)
    w.op(pickle.EMPTY_TUPLE + pickle.NEWOBJ)
    w.value(state)
    w.op(pickle.BUILD + pickle.STOP)
    from ..runtime.files import atomic_output

    path = Path(path)
    with atomic_output(path, binary=True) as f:
        f.write(w.out.getvalue())
    return path
