"""Reading a research-release file safely and finding its tensors by key pattern and shape.

The release's files are pickles (``torch.save``); their top-level names are not certain (the
published loader reads ``proj_module`` / ``SAA_module``, its training code writes
``image_proj`` / ``ip_adapter`` / ``adapter_modules``, a multi-GPU save adds ``module.``), so a
tensor is recognised by the longest dotted suffix of its flattened name that is a key of the
expected table, whatever wraps it. Everything is loaded with ``weights_only=True``: a pickle
that holds anything but tensors and plain containers is refused, never executed.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import re
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_LIST_AT_MOST = 8


class ReleaseImportError(ValueError):
    """A release file that cannot be imported; the message names the file and what is wrong with it."""


@dataclass
class LoadedFile:
    """One release file, flattened: dotted name -> tensor, plus what the import records about it."""

    source: str
    tensors: dict[str, Tensor]
    file_format: str
    ignored: list[str] = field(default_factory=list)  # non-tensor entries (ints, strings) found next to tensors


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_LIST_AT_MOST])
    return shown + (f", ... ({len(keys) - _LIST_AT_MOST} more)" if len(keys) > _LIST_AT_MOST else "")


def _is_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    (n,) = struct.unpack("<Q", data[:8])
    return 0 < n <= len(data) - 8 and data[8:9] == b"{"


def load_file(data: bytes, source: str) -> LoadedFile:
    """Bytes of a ``.bin`` / ``.pt`` pickle or a ``.safetensors`` file -> flattened tensors.

    Errors say which of: truncated or corrupt, not plain tensors (refused by weights_only), not a
    state dict (no tensors in it).
    """
    if not data:
        raise ReleaseImportError(f"{source}: the file is empty")
    if _is_safetensors(data):
        from safetensors.torch import load as load_safetensors

        try:
            obj, fmt = load_safetensors(data), "safetensors"
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise ReleaseImportError(f"{source}: truncated or corrupt safetensors file ({err})") from None
    else:
        fmt = "torch-zip" if data[:4] == b"PK\x03\x04" else "torch-legacy-pickle"
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            detail = _refused_global(str(err))
            if detail:  # a class weights_only does not allow (a well-formed pickle of other objects)
                raise ReleaseImportError(
                    f"{source}: not plain tensors: the pickle holds other Python objects ({detail}), which "
                    "weights_only loading refuses (it is never executed); re-save it as a state dict of tensors"
                ) from None
            raise ReleaseImportError(f"{source}: truncated or corrupt file ({_reason(err)})") from None
        except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError, IndexError,
                struct.error, json.JSONDecodeError) as err:
            raise ReleaseImportError(f"{source}: truncated or corrupt file ({_reason(err)})") from None
    tensors: dict[str, Tensor] = {}
    ignored: list[str] = []
    if isinstance(obj, Tensor) or not isinstance(obj, Mapping):
        raise ReleaseImportError(f"{source}: not a state dict: the file holds a {type(obj).__name__}, not a "
                                 "mapping of names to tensors")
    _flatten(obj, "", tensors, ignored, source)
    if not tensors:
        raise ReleaseImportError(f"{source}: not a state dict: no tensors in it"
                                 + (f" (only {_names(ignored)})" if ignored else ""))
    if ignored:
        log.warning("%s: ignoring %d non-tensor entries: %s", source, len(ignored), _names(ignored))
    return LoadedFile(source, tensors, fmt, ignored)


def _refused_global(message: str) -> str:
    """The global weights_only refused (e.g. ``GLOBAL argparse.Namespace``), or "" when it refused no global (a
    malformed pickle: an unknown opcode, a cut-off stream)."""
    m = re.search(r"GLOBAL ([\w.]+)", message)
    return f"GLOBAL {m.group(1)}" if m else ""


def _reason(err: BaseException) -> str:
    """The informative line of a loader error (torch's weights_only messages put it after a long preamble)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("Unsupported", "PytorchStreamReader", "invalid", "Invalid")):
            return line[:200]
    return lines[0][:200] if lines else type(err).__name__


def _flatten(obj: Mapping, prefix: str, out: dict[str, Tensor], ignored: list[str], source: str) -> None:
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Tensor):
            if name in out:
                raise ReleaseImportError(f"{source}: tensor name {name!r} appears twice")
            out[name] = value
        elif isinstance(value, Mapping):
            _flatten(value, f"{name}.", out, ignored, source)
        else:
            ignored.append(name)


def match_tables(loaded: LoadedFile, tables: dict[str, dict[str, tuple[int, ...]]],
                 what: str) -> dict[str, dict[str, Tensor]]:
    """Assign every tensor to (part, release key) by its longest matching dotted suffix, then check the set and
    every shape and dtype against the tables. Raises ReleaseImportError listing missing and unexpected tensors
    by name, or the tensors whose shape does not match ``what`` (e.g. "SD1.5")."""
    owner = {key: part for part, table in tables.items() for key in table}
    found: dict[str, dict[str, Tensor]] = {part: {} for part in tables}
    origin: dict[str, str] = {}
    unexpected: list[str] = []
    for name, tensor in loaded.tensors.items():
        parts = name.split(".")
        key = next((".".join(parts[i:]) for i in range(len(parts)) if ".".join(parts[i:]) in owner), None)
        if key is None:
            unexpected.append(name)
            continue
        if key in origin:
            raise ReleaseImportError(f"{loaded.source}: {key} is held twice (as {origin[key]} and as {name}); "
                                     "keep one copy of the weights in the file")
        origin[key] = name
        found[owner[key]][key] = tensor
    missing = [key for key in owner if key not in origin]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_names(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_names(sorted(unexpected))}")
    if problems:
        empty = [part for part in tables if not found[part]]
        hint = (f" (no tensor of the {' or '.join(empty)} at all: is this the right file?)" if empty else "")
        raise ReleaseImportError(f"{loaded.source}: " + "; ".join(problems) + hint)
    bad = []
    for part, table in tables.items():
        for key, want in table.items():
            t = found[part][key]
            if tuple(t.shape) != tuple(want):
                bad.append(f"{origin[key]} has shape {tuple(t.shape)}, {what} needs {tuple(want)}")
            elif key.endswith("num_batches_tracked"):
                if t.is_floating_point() or t.is_complex():
                    bad.append(f"{origin[key]} is {t.dtype}, an integer counter is needed")
            elif not t.is_floating_point():
                bad.append(f"{origin[key]} is {t.dtype}, weights must be floating point")
            elif not bool(torch.isfinite(t).all()):
                bad.append(f"{origin[key]} holds NaN or infinite values (corrupt weights)")
    if bad:
        raise ReleaseImportError(f"{loaded.source}: {len(bad)} tensor(s) do not fit: " + "; ".join(bad[:_LIST_AT_MOST])
                                 + (f"; ... ({len(bad) - _LIST_AT_MOST} more)" if len(bad) > _LIST_AT_MOST else ""))
    return found
