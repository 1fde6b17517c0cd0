"""Checkpoints and outputs written atomically (temp file, then rename), readable per the umask.

A checkpoint is ONE safetensors file: the metadata (JSON), a SHA-256 digest of the tensors and
one of the metadata text live in its header, so a crash leaves the old file or the new one,
never a half-written pair, and a corrupt, truncated or edited file is detected on read.
Checkpoints written before the metadata digest (mergeq before issue 24) are still read, their
tensors verified (their metadata is checked as any file's: types, layers, bit widths against
the codes); as are those of the earlier two-file form (tensors + a ``.json`` sidecar). Nothing
is ever unpickled. (A digest catches damage and careless edits, not a forger: it is no signature.)
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from .errors import CheckpointError, MergeqError

META_KEY, DIGEST_KEY, META_DIGEST_KEY = "mergeq_meta", "mergeq_sha256", "mergeq_meta_sha256"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``path`` through a temp file in the same folder and a rename; the file gets the
    mode a plain ``open`` would give it (0666 less the umask), not mkstemp's 0600."""
    path = Path(path)
    if path.is_dir():
        raise MergeqError(f"{path} is a directory; a file path is expected here")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def parse_json(text: str | bytes, where: str, error: type[MergeqError] = MergeqError) -> Any:
    """``text`` parsed as JSON; invalid UTF-8, invalid JSON or nesting too deep to parse raise
    ``error`` naming ``where`` (a file, or a file's header) and the line and column."""
    try:
        return json.loads(text)
    except UnicodeDecodeError as e:
        raise error(f"{where} is not valid UTF-8 (byte {e.object[e.start]:#04x} at position {e.start})") from None
    except json.JSONDecodeError as e:
        raise error(f"{where} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    except RecursionError:
        raise error(f"{where} is not usable JSON: its values are nested too deeply") from None


def read_text(path: str | os.PathLike, error: type[MergeqError] = MergeqError) -> str:
    """The UTF-8 text of ``path``; invalid UTF-8 raises ``error`` naming the file and the byte."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = e.object[:e.start].count(b"\n") + 1
        raise error(f"{path} is not valid UTF-8: byte {e.object[e.start]:#04x} at line {line} "
                    f"(position {e.start})") from None


_YAML_FLOAT = r"""^(?:
    [-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$"""


def _with_yaml12_floats(base: type) -> type:
    """``base`` (PyYAML's safe loader or dumper) resolving YAML 1.2's floats: ``1e-4`` is a float
    (YAML 1.1 needs ``1.0e-4`` and PyYAML reads ``1e-4`` as a string, which a float option then
    refuses). The dumper shares the loader's resolvers, so it quotes every string the loader would
    read as something else (``'1e1'``, ``'yes'``, ``'~'``, ``'2001-01-01'``)."""
    import re

    cls = type(f"Mergeq{base.__name__}", (base,), {})
    cls.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(_YAML_FLOAT, re.X), list("-+0123456789."))
    return cls


@functools.cache
def _yaml_loader():
    import yaml

    return _with_yaml12_floats(yaml.SafeLoader)


@functools.cache
def _yaml_dumper():
    import yaml

    return _with_yaml12_floats(yaml.SafeDumper)


def load_yaml(text: str) -> Any:
    """``text`` as YAML, safely (no Python objects), with ``1e-4`` read as a float."""
    import yaml

    return yaml.load(text, Loader=_yaml_loader())


def dump_yaml(obj: Any) -> str:
    """``obj`` (plain dicts, lists, strings, numbers, booleans, None) as YAML that :func:`load_yaml`
    reads back to ``obj``; keys in the order given, characters outside ASCII escaped (PyYAML's
    ``allow_unicode`` writes U+0085 raw, which reads back as a space)."""
    import yaml

    return yaml.dump(obj, Dumper=_yaml_dumper(), sort_keys=False)


def parse_yaml(text: str, where: str, error: type[MergeqError] = MergeqError) -> Any:
    """``text`` parsed as YAML (safe: no Python objects; ``1e-4`` a float); errors name ``where``,
    line and column."""
    import yaml

    try:
        return load_yaml(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        place = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise error(f"{where} is not valid YAML{place}: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise error(f"{where} is not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise error(f"{where} is not usable YAML: its values are nested too deeply") from None


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; a truncated or invalid one raises a MergeqError naming the file."""
    return parse_json(read_text(path), str(path))


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, blocking: bool = True, shared: bool = False) -> Iterator[bool]:
    """Hold an exclusive (or ``shared``) ``flock`` on ``path`` (created if needed) for the ``with``
    block; yields False without waiting if ``blocking`` is False and another process holds it (a
    shared lock: holds it exclusively). The OS drops the lock when its holder exits, so a crashed
    process never leaves a stale lock behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def check_out_dir(path: str | os.PathLike) -> Path:
    """Make sure an output folder can be created and written (before any work is done)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MergeqError(f"--out {path} is an existing file; an output folder is expected")
    path.mkdir(parents=True, exist_ok=True)
    _probe(path)
    return path


def utf8_name(path: str | os.PathLike, what: str, error: type[MergeqError] = MergeqError) -> Path:
    """``path``, or ``error`` naming it (undecodable bytes escaped) if it is not valid UTF-8:
    safetensors and onnxruntime open only UTF-8 paths, and a data split's fingerprint hashes names."""
    raw = os.fsencode(path)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} {raw.decode('utf-8', 'backslashreplace')}: the name is not valid UTF-8 "
                    f"(byte {raw[e.start]:#04x}); rename it") from None
    return Path(path)


def check_out_file(path: str | os.PathLike) -> Path:
    """Make sure an output file can be written (its folder created and writable, not a folder)."""
    path = Path(path)
    if path.is_dir():
        raise MergeqError(f"--out {path} is an existing directory; a file path is expected")
    path.parent.mkdir(parents=True, exist_ok=True)
    _probe(path.parent)
    return path


def _probe(folder: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".mergeq-write-test.")
    os.close(fd)
    os.unlink(tmp)


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of ``tensors`` (CPU, contiguous)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"{key}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(state_dict: dict[str, torch.Tensor], path: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write one safetensors file holding the tensors, ``meta`` (JSON) and the tensors' digest."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    text = json.dumps(meta)
    header = {"format": "pt", META_KEY: text, DIGEST_KEY: tensor_digest(tensors),
              META_DIGEST_KEY: hashlib.sha256(text.encode()).hexdigest()}
    return atomic_write_bytes(path, st_save(tensors, metadata=header))


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON sidecar of a checkpoint of the earlier two-file form (read only)."""
    return Path(path).with_suffix(".json")


def _open(path: Path, tensors: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    utf8_name(path, "checkpoint", CheckpointError)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            out = {k: (f.get_tensor(k) if tensors else f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} is not a readable safetensors file: {e}") from None
    return header, out


def _meta(path: Path, header: dict[str, str]) -> dict[str, Any]:
    if header.get("format") == "mergeq-packed":
        raise CheckpointError(f"{path} is a packed export (mergeq export); load it with mergeq.deploy.load_packed")
    if META_KEY in header:
        text, where = header[META_KEY], f"header metadata of {path}"
        if META_DIGEST_KEY in header and hashlib.sha256(text.encode()).hexdigest() != header[META_DIGEST_KEY]:
            raise CheckpointError(f"checkpoint {path} fails its SHA-256 check: its metadata was edited or damaged")
    else:  # the earlier two-file form
        side = sidecar_path(path)
        if not side.is_file():
            raise CheckpointError(f"checkpoint {path} holds no mergeq metadata and its sidecar {side} does not exist")
        text, where = read_text(side, CheckpointError), f"checkpoint metadata {side}"
    meta = parse_json(text, where, CheckpointError)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where} must be a JSON object")
    return meta


def read_checkpoint_header(path: str | os.PathLike) -> tuple[dict[str, list[int]], dict[str, Any]]:
    """Tensor shapes and metadata of a checkpoint, without reading the tensors."""
    path = Path(path)
    header, shapes = _open(path, tensors=False)
    return shapes, _meta(path, header)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint` (or the earlier two-file form); raise
    :class:`CheckpointError` if it is missing, truncated, corrupt or fails its digest."""
    path = Path(path)
    header, tensors = _open(path, tensors=True)
    meta = _meta(path, header)
    if DIGEST_KEY in header and tensor_digest(tensors) != header[DIGEST_KEY]:
        raise CheckpointError(f"checkpoint {path} fails its SHA-256 check: its tensors were changed or damaged")
    return tensors, meta


def config_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted names of the entries in which two (nested) config dicts differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in dict.fromkeys([*old, *new])
                for d in config_diff(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def earlier_results(out: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The config (parsed ``config.yaml``) and results (``results.json``) of an earlier run in ``out``;
    None if ``out`` holds no results. A results file that cannot be read or matched to its config
    raises a MergeqError naming it: a rerun must never overwrite rows it cannot account for."""
    res, cfg = Path(out) / "results.json", Path(out) / "config.yaml"
    if not res.exists():
        return None
    if not cfg.is_file():
        raise MergeqError(f"{out} holds {res.name} but no config.yaml to resume from: use another --out")
    try:
        config = parse_yaml(read_text(cfg), str(cfg))
    except MergeqError as e:
        raise MergeqError(f"{e}: use another --out") from None
    rows = read_json(res)
    if not isinstance(config, dict) or not isinstance(rows, dict) or not isinstance(rows.get("rows"), list):
        raise MergeqError(f"{out} holds a config.yaml / results.json that mergeq did not write: use another --out")
    return config, rows
