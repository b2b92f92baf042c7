"""`cifar10:PATH` and `cifar100:PATH` - the python-pickle batches or the binary version.

PATH may be the extracted folder (cifar-10-batches-py, cifar-10-batches-bin, cifar-100-python,
cifar-100-binary), its parent, or the downloaded .tar.gz archive. The pickles are read with an unpickler that
admits only what those files hold: dicts, lists, bytes, strings, numbers and numpy arrays.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.shards.sources.base import ArraySource

_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 carry bytes
}

LAYOUTS = {
    # form: (pickle train members, pickle test member, meta member, meta key, label key)
    "cifar10": (["data_batch_%d" % i for i in range(1, 6)], "test_batch", "batches.meta", b"label_names", b"labels"),
    "cifar100": (["train"], "test", "meta", b"fine_label_names", b"fine_labels"),
}
BINARY = {
    # form: (train members, test member, class-names member, label bytes per record, which label byte)
    "cifar10": (["data_batch_%d.bin" % i for i in range(1, 6)], "test_batch.bin", "batches.meta.txt", 1, 0),
    "cifar100": (["train.bin"], "test.bin", "fine_label_names.txt", 2, 1),
}
RECORD_PIXELS = 3 * 32 * 32


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _NUMPY_GLOBALS:
            if module.startswith("numpy.core"):
                module = module.replace("numpy.core", "numpy._core")
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR batch file")


def restricted_load(data: bytes, origin: str):
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as exc:
        raise PipelineError(f"{origin}: not a readable CIFAR batch file ({exc})") from exc


class _Members:
    """Files of an extracted folder or of a .tar.gz archive, looked up by base name."""

    def __init__(self, path: Path):
        self.path = path
        self._data: dict[str, bytes] = {}
        if path.is_file():
            try:
                with tarfile.open(path) as tar:
                    for m in tar.getmembers():
                        if m.isfile():
                            self._data[Path(m.name).name] = tar.extractfile(m).read()
            except (tarfile.TarError, OSError) as exc:
                raise PipelineError(f"{path}: not a readable CIFAR archive ({exc})") from exc
            self._files: dict[str, Path] = {}
        else:
            self._files = {p.name: p for p in path.rglob("*") if p.is_file()}

    def __contains__(self, name: str) -> bool:
        return name in self._data or name in self._files

    def read(self, name: str) -> bytes:
        if name in self._data:
            return self._data[name]
        return self._files[name].read_bytes()


class CifarSource(ArraySource):
    def __init__(self, arg: str | None, form: str):
        super().__init__()
        if not arg:
            raise PipelineError(f"{form}: needs a path, e.g. {form}:/data/cifar-10-batches-py")
        path = Path(arg).expanduser()
        if not path.exists():
            raise PipelineError(f"{path}: no such file or folder ({form}:PATH)")
        self.name, self.mode = form, "RGB"
        members = _Members(path)
        train_names, test_name, meta_name, meta_key, label_key = LAYOUTS[form]
        btrain, btest, bnames, nlabel, which = BINARY[form]
        if all(n in members for n in train_names + [test_name]):
            self._read_pickles(members, path, train_names, test_name, meta_name, meta_key, label_key)
        elif all(n in members for n in btrain + [btest]):
            self._read_binary(members, path, btrain, btest, bnames, nlabel, which)
        else:
            raise PipelineError(
                f"{path}: no {form} batches found (expected {', '.join(train_names + [test_name])} "
                f"or the binary {', '.join(btrain + [btest])})"
            )

    def _read_pickles(self, members, path, train_names, test_name, meta_name, meta_key, label_key):
        def batch(name):
            d = restricted_load(members.read(name), f"{path}/{name}")
            if not isinstance(d, dict) or b"data" not in d or label_key not in d:
                raise PipelineError(f"{path}/{name}: not a CIFAR batch (missing data or labels)")
            data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            return data, np.asarray(d[label_key], dtype=np.int64)

        parts = [batch(n) for n in train_names]
        self._set_split("train", np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        self._set_split("test", *batch(test_name))
        if meta_name in members:
            meta = restricted_load(members.read(meta_name), f"{path}/{meta_name}")
            self.classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[meta_key]]
        else:
            self.classes = [str(i) for i in range(int(self._labels["train"].max()) + 1)]

    def _read_binary(self, members, path, btrain, btest, bnames, nlabel, which):
        def batch(name):
            raw = np.frombuffer(members.read(name), dtype=np.uint8)
            rec = nlabel + RECORD_PIXELS
            if raw.size % rec:
                raise PipelineError(f"{path}/{name}: truncated binary batch ({raw.size} bytes, records of {rec})")
            raw = raw.reshape(-1, rec)
            return raw[:, nlabel:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), raw[:, which].astype(np.int64)

        parts = [batch(n) for n in btrain]
        self._set_split("train", np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        self._set_split("test", *batch(btest))
        if bnames in members:
            self.classes = [ln.strip() for ln in members.read(bnames).decode().splitlines() if ln.strip()]
        else:
            self.classes = [str(i) for i in range(int(self._labels["train"].max()) + 1)]
