"""Safe reading and writing of the files cm3leon produces: one error type, checksummed safetensors files.

Every loader in cm3leon (model checkpoints, tokenizers, vocabularies) raises :class:`CheckpointError` for a
file that is damaged, truncated, of another kind or inconsistent with itself, with a message naming the file
and what is wrong. Tensor files are safetensors (loading one never executes code) whose metadata holds a
``format`` tag, the file's own entries, and ``checksums``: the SHA-256 of every other metadata entry and of
every tensor's bytes, verified on load unless the caller opts out (``verify=False``).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping

import torch

__all__ = ["CheckpointError", "TensorFile", "save_tensor_file", "check_index", "parse_json", "json_digest"]

CHECKSUMS_KEY = "checksums"

# safetensors' dtype names (the header's "dtype" field) for the dtypes torch can hold.
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class CheckpointError(ValueError):
    """A file cm3leon was asked to load is damaged, truncated, of another kind or inconsistent.

    The message starts with the file's path and says what is wrong. A subclass of ``ValueError``, so code
    that caught ``ValueError`` from the loaders keeps working.
    """


def parse_json(text: str, error: Callable[[str], CheckpointError], what: str) -> object:
    """``json.loads(text)``, failures (also absurd nesting) raised as ``error(...)`` naming ``what``."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:
        raise error(f"{what} is not valid JSON ({type(err).__name__}: {err})") from None


Index = Mapping[str, tuple[tuple[int, ...], torch.dtype]]  # name -> (shape, dtype), from a file's header


def check_index(index: Index, expected: Mapping[str, torch.Tensor],
                error: Callable[[str], CheckpointError], *,
                float_dtypes: tuple[torch.dtype, ...] | None = None) -> torch.dtype | None:
    """Checks a file's tensor index against the tensors a module expects (e.g. a meta model's state dict).

    Names must match exactly and shapes must be equal. Dtypes must equal the expected ones, or, with
    ``float_dtypes``, be one dtype from that tuple shared by every tensor (returned): nothing is cast
    silently (an integer or bool tensor of the right shape would otherwise load as floats).
    """
    missing, unexpected = sorted(set(expected) - set(index)), sorted(set(index) - set(expected))
    if missing or unexpected:
        more = lambda names: "..." if len(names) > 8 else ""  # noqa: E731
        raise error(f"its tensors do not match the config: missing {missing[:8]}{more(missing)}, "
                    f"unexpected {unexpected[:8]}{more(unexpected)}")
    shared = None
    for name, want in expected.items():
        shape, dtype = index[name]
        if shape != tuple(want.shape):
            raise error(f"tensor {name!r} has shape {shape}, the config expects {tuple(want.shape)}")
        if float_dtypes is None:
            if dtype != want.dtype:
                raise error(f"tensor {name!r} has dtype {dtype}, expected {want.dtype}")
            continue
        if dtype not in float_dtypes:
            raise error(f"tensor {name!r} has dtype {dtype}; weights must be one of "
                        f"{', '.join(str(d) for d in float_dtypes)}")
        if shared is not None and dtype != shared:
            raise error(f"tensor {name!r} has dtype {dtype} but others have {shared}: one dtype per file")
        shared = dtype
    return shared


def _digest(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def json_digest(data: Mapping[str, object]) -> str:
    """SHA-256 of a JSON-able mapping in canonical form (sorted keys): the checksum of small JSON files."""
    return _digest(json.dumps(data, sort_keys=True).encode())


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a CPU tensor's bytes in row-major order (what safetensors stores)."""
    flat = tensor.detach().contiguous().reshape(-1)
    return _digest(flat.view(torch.uint8).numpy().data if flat.numel() else b"")


def save_tensor_file(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], *, kind: str,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Writes ``tensors`` (moved to the CPU) to a safetensors file tagged ``format=kind`` with ``metadata``
    and the checksums of both; written to a temporary name and renamed, so ``path`` is never half-written."""
    from safetensors.torch import save_file

    cpu = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    entries = dict(metadata or {})
    if "format" in entries or CHECKSUMS_KEY in entries:
        raise ValueError(f"metadata keys 'format' and {CHECKSUMS_KEY!r} are reserved")
    checksums = {"metadata": {key: _digest(value.encode()) for key, value in entries.items()},
                 "tensors": {name: tensor_digest(t) for name, t in cpu.items()}}
    tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
    try:
        save_file(cpu, tmp, metadata={"format": kind, **entries, CHECKSUMS_KEY: json.dumps(checksums)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class TensorFile:
    """An open safetensors file written by :func:`save_tensor_file`, read defensively.

    Opening checks the header and the ``format`` tag; :attr:`metadata` is then verified against its
    checksums (with ``verify``), and :meth:`index` lists names, shapes and dtypes without reading any tensor
    data, so callers can validate the file against what they expect *before* allocating anything.
    :meth:`tensor` reads one tensor and verifies its checksum. Every failure is a :class:`CheckpointError`.
    Use as a context manager.
    """

    def __init__(self, path: str | os.PathLike, *, kind: str | None, verify: bool = True,
                 what: str = "cm3leon file") -> None:
        """``kind=None`` opens a foreign safetensors file (no format tag, no checksums: ``verify`` must be
        False)."""
        from safetensors import safe_open

        if kind is None and verify:
            raise ValueError("a foreign file (kind=None) has no checksums to verify")
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"{self.path}: no such file")
        try:
            self._file = safe_open(self.path, framework="pt", device="cpu")
        except Exception as err:  # safetensors raises its own SafetensorError (and others) for bad headers
            raise self.error(f"not a readable safetensors file ({type(err).__name__}: {err})") from err
        try:
            header = self._file.metadata() or {}
            self._names = list(self._file.keys())
            if kind is not None and header.get("format") != kind:
                raise self.error(f"is not a {what} (metadata format={header.get('format')!r}, "
                                 f"expected {kind!r})")
            self._checksums = self._read_checksums(header) if verify else None
            self.metadata = {k: v for k, v in header.items() if k not in ("format", CHECKSUMS_KEY)}
            if self._checksums is not None:
                self._verify_metadata()
        except BaseException:
            self.close()
            raise

    def error(self, message: str) -> CheckpointError:
        """A :class:`CheckpointError` about this file."""
        return CheckpointError(f"{self.path}: {message}")

    def _read_checksums(self, header: Mapping[str, str]) -> dict:
        if CHECKSUMS_KEY not in header:
            raise self.error("has no checksums (written by an older cm3leon?); pass verify=False to load it "
                             "unverified")
        checksums = parse_json(header[CHECKSUMS_KEY], self.error, "its checksum table")
        if not (isinstance(checksums, dict) and isinstance(checksums.get("metadata"), dict)
                and isinstance(checksums.get("tensors"), dict)):
            raise self.error("its checksum table is damaged")
        return checksums

    def _verify_metadata(self) -> None:
        expected = self._checksums["metadata"]
        if set(expected) != set(self.metadata):
            raise self.error(f"metadata entries {sorted(self.metadata)} do not match its checksum table "
                             f"{sorted(expected)}")
        for key, value in self.metadata.items():
            if _digest(value.encode()) != expected[key]:
                raise self.error(f"metadata entry {key!r} fails its checksum (the file is damaged)")
        if set(self._checksums["tensors"]) != set(self._names):
            raise self.error("its tensor names do not match its checksum table (the file is damaged)")

    def index(self) -> Index:
        """``{name: (shape, dtype)}`` of every tensor, read from the header only."""
        out = {}
        for name in self._names:
            try:
                info = self._file.get_slice(name)
                shape, dtype_name = tuple(info.get_shape()), info.get_dtype()
            except Exception as err:
                raise self.error(f"tensor {name!r} has an unreadable header entry ({err})") from err
            if dtype_name not in _DTYPES:
                raise self.error(f"tensor {name!r} has dtype {dtype_name}, which cm3leon never writes")
            out[name] = (shape, _DTYPES[dtype_name])
        return out

    def tensor(self, name: str) -> torch.Tensor:
        """Reads tensor ``name`` (verified against its checksum unless ``verify=False``)."""
        try:
            t = self._file.get_tensor(name)
        except Exception as err:
            raise self.error(f"tensor {name!r} cannot be read ({type(err).__name__}: {err})") from err
        if self._checksums is not None and tensor_digest(t) != self._checksums["tensors"][name]:
            raise self.error(f"tensor {name!r} fails its checksum (the file is damaged); "
                             "verify=False loads it anyway")
        return t

    def tensors(self, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        return {name: self.tensor(name) for name in (self._names if names is None else names)}

    def json_entry(self, key: str) -> object:
        """Metadata entry ``key`` parsed as JSON."""
        if key not in self.metadata:
            raise self.error(f"has no {key!r} metadata entry")
        return parse_json(self.metadata[key], self.error, f"metadata entry {key!r}")

    def close(self) -> None:
        self._file.__exit__(None, None, None)

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
