"""Refuse a ``.pt2`` archive that ``torch.export.load`` would unpickle.

``workers.loader`` calls ``check_pickle_free`` before ``torch.export.load`` ever opens the
file: every entry that would take one of its pickle paths is refused with a
``ModelLoadError`` naming it.
"""

from __future__ import annotations

import io
import json
import zipfile

import torch

from workers.load_errors import ModelLoadError, describe_error


def check_pickle_free(path: str) -> None:
    """Refuse a .pt2 archive that torch.export.load would unpickle without restriction.

    torch.export.load uses ``weights_only=False`` or ``pickle.loads`` for: the pre-2.5
    archive layout, config entries marked ``use_pickle``, custom/opaque object
    constants, and any embedded ``.pt`` that fails a ``weights_only=True`` load (it
    retries without the restriction). Each is checked here before it can run.
    """
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            roots = [n[: -len("archive_format")] for n in names if n.endswith("archive_format")]
            root = next((r for r in roots if r.count("/") <= 1), None)
            if root is None or z.read(root + "archive_format").strip() != b"pt2":
                raise ModelLoadError(
                    f"{path}: not a PT2 archive from torch.export.save (torch >= 2.5); "
                    "older layouts need pickle and are refused"
                )
            for name in names:
                rel = name[len(root) :] if name.startswith(root) else name
                if rel.startswith(("data/weights/", "data/constants/")) and rel.endswith(
                    "_config.json"
                ):
                    _check_payload_config(path, rel, z.read(name))
                elif rel.endswith(".pt"):
                    try:
                        torch.load(io.BytesIO(z.read(name)), weights_only=True)
                    except Exception as e:
                        raise ModelLoadError(
                            f"{path}: archive entry {rel} needs unrestricted pickle "
                            f"({describe_error(e)}); refused"
                        ) from e
    except (zipfile.BadZipFile, OSError, KeyError) as e:
        raise ModelLoadError(
            f"{path}: not a readable .pt2 (zip) archive: {describe_error(e)}"
        ) from e


def _check_payload_config(path: str, rel: str, raw: bytes) -> None:
    try:
        entries = json.loads(raw)["config"]
        items = list(entries.items())
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelLoadError(
            f"{path}: archive entry {rel} is malformed: {describe_error(e)}"
        ) from e
    for fqn, meta in items:
        if not isinstance(meta, dict):
            raise ModelLoadError(f"{path}: archive entry {rel}: {fqn} is malformed")
        if meta.get("use_pickle"):
            raise ModelLoadError(f"{path}: {fqn} in {rel} is stored with pickle; refused")
        if rel.startswith("data/constants/") and not str(meta.get("path_name", "")).startswith(
            "tensor_"
        ):
            raise ModelLoadError(
                f"{path}: constant {fqn} in {rel} is a pickled object, not a tensor; refused"
            )
