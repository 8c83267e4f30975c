"""On-disk store of image embeddings for training and evaluation.

:class:`EmbeddingStore` keeps one safetensors file per embedding, like micro-sam's embedding files,
under the canonical key :func:`sam_core.inference.embedding_cache.embedding_key`: the store carries a
*signature* (model id, preprocessing version, encoder adapter, data set fingerprint, ...) written to
``signature.json`` and copied into every entry, and both are checked when the store is opened and
when an entry is loaded. A mismatch is an error, never a silent reuse of embeddings computed by
something else.

Files are only ever read with safetensors (never pickle) and written atomically with
:func:`sam_core.files.atomic_write_bytes` (temporary file in the same directory, ``fsync``,
``os.replace``, ``fsync`` of the directory), so a crash leaves either the old entry, the new entry
or nothing, never a half-written file under an entry's name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from sam_core.errors import InvalidInput
from sam_core.files import atomic_write_bytes, atomic_write_text, is_temporary
from sam_core.inference.embedding_cache import canonical_encoder_adapter
from sam_core.inference.types import Embedding

logger = logging.getLogger(__name__)

ENTRY_FORMAT = "samforge-embedding-v2"
"""``format`` value in the safetensors metadata of every stored entry (v2: one tensor per named feature
level; a v1 entry reads as corrupt, so it is deleted and recomputed)."""

STORE_FORMAT = "samforge-embedding-store-v1"
"""``format`` value of ``signature.json``."""

SIGNATURE_FILE = "signature.json"
STORAGE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""Accepted ``dtype`` names of :class:`EmbeddingStore` (features always come back float32)."""

_KEY_RE = re.compile(r"[0-9a-f]{8,128}")
_SHARD_RE = re.compile(r"[0-9a-f]{2}")
_EMBEDDING_FIELDS = ("model_id", "preprocess_version", "encoder_adapter")
_FIELD = "embedding_store"


def _check_key(key: object) -> str:
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise InvalidInput(f"expected a lowercase hex key of 8 to 128 characters, got {key!r}", field="key")
    return key


def _features_digest(features: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the names, shapes and raw bytes of contiguous CPU tensors, in order (bfloat16 is viewed
    as int16 for numpy)."""
    digest = hashlib.sha256()
    for name, tensor in features.items():
        raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
        digest.update(f"{name}|{tuple(tensor.shape)}|".encode())
        digest.update(raw.numpy().data.cast("B"))
    return digest.hexdigest()


def _check_levels(features: object) -> None:
    if not isinstance(features, dict) or not features or not all(
            isinstance(name, str) and isinstance(t, torch.Tensor) and t.ndim == 4 and t.shape[0] == 1
            and t.is_floating_point() for name, t in features.items()):
        raise InvalidInput("features must map level names to 1 x C x h x w floating-point tensors",
                           field="embedding.features")


class _CorruptEntry(Exception):
    """An entry file that cannot be parsed or fails its checksum (deleted and treated as absent)."""


class EmbeddingStore:
    """A directory of embeddings, one ``<root>/<key[:2]>/<key>.safetensors`` file each.

    ``signature`` names what the embeddings depend on, e.g. ``{"model_id": ..., "preprocess_version":
    ..., "encoder_adapter": ..., "dataset": <fingerprint>}`` (str -> str; ``None`` is accepted as a
    value and means "not set", e.g. no encoder adapter). Opening a store writes it to
    ``<root>/signature.json`` or checks it against the one already there; a different signature
    (or a different storage ``dtype``) raises :class:`~sam_core.errors.InvalidInput` with
    ``field="embedding_store"`` naming the fields that differ, unless ``reset_on_mismatch=True``,
    which deletes every entry, rewrites the signature, logs a warning and records the differing
    fields in :attr:`reset_fields`.

    Entries embed the signature, their key and the embedding's own facts in their safetensors
    metadata; :meth:`get` refuses (raises) an entry whose metadata disagrees with the store, and
    deletes (with a warning) and reports absent an entry that is corrupt or truncated.

    ``dtype="bfloat16"`` stores features in bfloat16, halving disk use; features always come back as
    float32 (bfloat16-rounded in that case). :meth:`put` / :meth:`get` are safe to call from several
    threads or processes: writes are atomic renames, so a reader sees a whole entry or none.
    """

    def __init__(self, root: str | os.PathLike[str], *, signature: Mapping[str, str | None],
                 dtype: str = "float32", reset_on_mismatch: bool = False) -> None:
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
        if not isinstance(signature, Mapping) or not all(
            isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in signature.items()
        ):
            raise InvalidInput(f"must map str to str (or None), got {signature!r}", field="signature")
        self.root = Path(root)
        self.dtype = dtype
        self.signature: dict[str, str | None] = dict(sorted(signature.items()))
        self._signature_json = json.dumps(self.signature, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
        self.reset_fields: tuple[str, ...] = ()
        self.root.mkdir(parents=True, exist_ok=True)
        self._open(reset_on_mismatch)

    # ------------------------------------------------------------------ signature
    @property
    def signature_path(self) -> Path:
        return self.root / SIGNATURE_FILE

    def _signature_document(self) -> dict[str, object]:
        return {"format": STORE_FORMAT, "dtype": self.dtype, "signature": self.signature}

    def _write_signature(self) -> None:
        data = json.dumps(self._signature_document(), sort_keys=True, indent=2) + "\n"
        atomic_write_text(self.signature_path, data)

    def _differences(self) -> tuple[list[str], list[str]]:
        """(differing field names, human-readable descriptions) between signature.json and this store."""
        try:
            stored = json.loads(self.signature_path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            return ["signature.json"], [f"signature.json is unreadable ({exc})"]
        if not isinstance(stored, dict) or stored.get("format") != STORE_FORMAT \
                or not isinstance(stored.get("signature"), dict):
            return ["signature.json"], [f"signature.json is not a {STORE_FORMAT} document"]
        absent = "<absent>"
        names: list[str] = []
        details: list[str] = []
        old_sig: dict[str, object] = stored["signature"]
        for name in sorted(set(old_sig) | set(self.signature)):
            old, new = old_sig.get(name, absent), self.signature.get(name, absent)
            if old != new:
                names.append(name)
                details.append(f"{name}: stored {old!r}, requested {new!r}")
        if stored.get("dtype") != self.dtype:
            names.append("dtype")
            details.append(f"dtype: stored {stored.get('dtype')!r}, requested {self.dtype!r}")
        return names, details

    def _open(self, reset_on_mismatch: bool) -> None:
        if self.signature_path.exists():
            names, details = self._differences()
        elif next(self._entry_paths(), None) is not None:
            names, details = ["signature.json"], ["entries exist but signature.json is missing"]
        else:
            self._write_signature()
            return
        if not names:
            return
        message = f"{self.root} holds embeddings with another signature: " + "; ".join(details)
        if not reset_on_mismatch:
            raise InvalidInput(message + " (open it with reset_on_mismatch=True to wipe it)", field=_FIELD)
        logger.warning("%s; wiping %d entries and rewriting the signature", message, len(self))
        self.clear()
        self._write_signature()
        self.reset_fields = tuple(names)

    # ------------------------------------------------------------------ paths
    def path_for(self, key: str) -> Path:
        """``<root>/<key[:2]>/<key>.safetensors`` (the key is validated: lowercase hex, 8-128 chars)."""
        key = _check_key(key)
        return self.root / key[:2] / f"{key}.safetensors"

    def _shard_dirs(self) -> Iterator[Path]:
        try:
            children = list(os.scandir(self.root))
        except FileNotFoundError:
            return
        for entry in children:
            if entry.is_dir(follow_symlinks=False) and _SHARD_RE.fullmatch(entry.name):
                yield Path(entry.path)

    def _entry_paths(self) -> Iterator[Path]:
        for shard in self._shard_dirs():
            yield from (p for p in shard.glob("*.safetensors") if _KEY_RE.fullmatch(p.stem))

    def keys(self) -> list[str]:
        """Keys of all stored entries (walks the directory)."""
        return [p.stem for p in self._entry_paths()]

    # ------------------------------------------------------------------ entries
    def _check_embedding(self, embedding: Embedding) -> None:
        """Refuse to store an embedding that contradicts the store's signature."""
        for name in _EMBEDDING_FIELDS:
            if name not in self.signature:
                continue
            expected, actual = self.signature[name], getattr(embedding, name)
            if name == "encoder_adapter":
                expected, actual = canonical_encoder_adapter(expected), canonical_encoder_adapter(actual)
            if expected != actual:
                raise InvalidInput(
                    f"embedding has {name}={actual!r} but this store's signature has {expected!r}", field="embedding"
                )

    def _encode(self, key: str, embedding: Embedding) -> tuple[dict[str, torch.Tensor], bytes]:
        _check_levels(embedding.features)
        stored = {name: t.detach().to(device="cpu", dtype=STORAGE_DTYPES[self.dtype]).contiguous()
                  for name, t in embedding.features.items()}
        metadata = {
            "format": ENTRY_FORMAT,
            "key": key,
            "signature": self._signature_json,
            "dtype": self.dtype,
            "original_size": json.dumps([int(v) for v in embedding.original_size]),
            "input_size": json.dumps([int(v) for v in embedding.input_size]),
            "model_id": embedding.model_id,
            "preprocess_version": embedding.preprocess_version,
            "encoder_adapter": canonical_encoder_adapter(embedding.encoder_adapter) or "",
            "levels": json.dumps(list(stored)),  # safetensors sorts tensors by name: this keeps the model's order
            "features_sha256": _features_digest(stored),
        }
        return stored, safetensors.torch.save(stored, metadata=metadata)

    def put(self, key: str, embedding: Embedding) -> None:
        """Store ``embedding`` (every level 1 x C x h x w) under ``key``, atomically replacing any old entry.

        Raises InvalidInput (``field="embedding"``) if the embedding's model_id / preprocess_version /
        encoder_adapter contradict the store's signature.
        """
        self._write(key, embedding)

    def _write(self, key: str, embedding: Embedding) -> dict[str, torch.Tensor]:
        """Validate, serialise and atomically write one entry; returns the stored (CPU, storage dtype) features."""
        path = self.path_for(key)
        self._check_embedding(embedding)
        stored, data = self._encode(key, embedding)
        path.parent.mkdir(exist_ok=True)
        atomic_write_bytes(path, data)
        return stored

    def _read(self, path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
        try:
            with safetensors.safe_open(str(path), framework="pt") as fh:
                metadata = fh.metadata() or {}
                if metadata.get("format") != ENTRY_FORMAT:
                    raise _CorruptEntry(f"metadata format is {metadata.get('format')!r}, expected {ENTRY_FORMAT!r}")
                levels = json.loads(metadata.get("levels", "null"))
                if not isinstance(levels, list) or sorted(levels) != sorted(fh.keys()) or not levels:
                    raise _CorruptEntry(f"tensors {sorted(fh.keys())} do not match the levels {levels}")
                features = {str(name): fh.get_tensor(name) for name in levels}
        except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise _CorruptEntry(str(exc)) from exc
        for name, tensor in features.items():
            if tensor.ndim != 4 or tensor.dtype not in STORAGE_DTYPES.values():
                raise _CorruptEntry(f"features {name!r} have shape {tuple(tensor.shape)} and dtype {tensor.dtype}")
        if metadata.get("features_sha256") != _features_digest({n: t.contiguous() for n, t in features.items()}):
            raise _CorruptEntry("features checksum mismatch")
        return metadata, features

    def _decode(self, key: str, path: Path, metadata: dict[str, str], features: dict[str, torch.Tensor]) -> Embedding:
        if metadata.get("signature") != self._signature_json:
            raise InvalidInput(
                f"entry {path} was written with signature {metadata.get('signature')}, "
                f"this store's is {self._signature_json}", field=_FIELD,
            )
        if metadata.get("key") != key:
            raise InvalidInput(f"entry {path} says its key is {metadata.get('key')!r}, not {key!r}", field=_FIELD)
        try:
            embedding = Embedding(
                features={name: t.float() for name, t in features.items()},
                original_size=_pair(metadata["original_size"]),
                input_size=_pair(metadata["input_size"]),
                model_id=metadata["model_id"],
                preprocess_version=metadata["preprocess_version"],
                encoder_adapter=metadata["encoder_adapter"] or None,
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise _CorruptEntry(f"bad metadata: {exc}") from exc
        try:
            self._check_embedding(embedding)
        except InvalidInput as exc:
            raise InvalidInput(f"entry {path}: {exc.detail}", field=_FIELD) from exc
        return embedding

    def get(self, key: str) -> Embedding | None:
        """The embedding stored under ``key`` (every level 1 x C x h x w float32), or None if absent.

        A corrupt or truncated entry is deleted (with a warning) and reported absent; an entry whose
        metadata disagrees with the store's signature or with ``key`` raises InvalidInput
        (``field="embedding_store"``) and is left in place.
        """
        path = self.path_for(key)
        if not path.is_file():
            return None
        try:
            metadata, features = self._read(path)
            return self._decode(key, path, metadata, features)
        except _CorruptEntry as exc:
            logger.warning("deleting corrupt embedding entry %s: %s", path, exc)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return None

    def get_or_compute(self, key: str, compute: Callable[[], Embedding]) -> Embedding:
        """Stored embedding for ``key``, or ``compute()`` stored under ``key`` and returned.

        The computed embedding is returned as :meth:`get` would return it later (float32 features,
        rounded through the storage dtype), so a first epoch and later epochs see the same values.
        """
        found = self.get(key)
        if found is not None:
            return found
        embedding = compute()
        stored = self._write(key, embedding)
        return Embedding(
            features={name: t.float() for name, t in stored.items()},
            original_size=(int(embedding.original_size[0]), int(embedding.original_size[1])),
            input_size=(int(embedding.input_size[0]), int(embedding.input_size[1])),
            model_id=embedding.model_id,
            preprocess_version=embedding.preprocess_version,
            encoder_adapter=canonical_encoder_adapter(embedding.encoder_adapter),
        )

    def delete(self, key: str) -> bool:
        """Remove the entry for ``key``; True if there was one."""
        try:
            self.path_for(key).unlink()
        except FileNotFoundError:
            return False
        return True

    def __contains__(self, key: object) -> bool:
        """True if a file exists for ``key`` (its contents are not validated; invalid keys are absent)."""
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
            return False
        return self.path_for(key).is_file()

    def __len__(self) -> int:
        """Number of stored entries (walks the directory)."""
        return sum(1 for _ in self._entry_paths())

    def nbytes(self) -> int:
        """Total size on disk of the stored entry files, in bytes (walks the directory)."""
        total = 0
        for path in self._entry_paths():
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
        return total

    def clear(self) -> None:
        """Delete every entry (and leftover temporary files); signature.json and foreign files stay."""
        for shard in list(self._shard_dirs()):
            for path in shard.iterdir():
                is_entry = path.suffix == ".safetensors" and _KEY_RE.fullmatch(path.stem)
                is_temp = is_temporary(path)
                if (is_entry or is_temp) and path.is_file():
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
            with contextlib.suppress(OSError):
                shard.rmdir()

    def __repr__(self) -> str:
        return f"EmbeddingStore(root={str(self.root)!r}, dtype={self.dtype!r}, signature={self.signature!r})"


def _pair(text: str) -> tuple[int, int]:
    value = json.loads(text)
    if not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, int) for v in value):
        raise ValueError(f"expected [int, int], got {text!r}")
    return int(value[0]), int(value[1])


