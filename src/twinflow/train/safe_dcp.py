"""Load ``torch.distributed.checkpoint`` (DCP) folders without letting them run code.

DCP unpickles two things when it loads a folder: its ``.metadata`` file (plain ``pickle.load``
in ``FileSystemReader.read_metadata``) and every non-tensor entry of its ``.distcp`` files,
such as the optimizer's hyperparameters (``torch.load(weights_only=False)`` in
``DefaultLoadPlanner.load_bytes``). A pickle may call any function it names, so resuming a
sharded checkpoint someone else wrote could run their code. Here the metadata goes through an
unpickler that finds only the classes DCP's metadata is made of, and the non-tensor entries
through torch's weights-only unpickler; anything else is refused with
:class:`UnsafeCheckpointError` before it runs. Tensors DCP already reads with ``weights_only``.
"""

from __future__ import annotations

import io
import os
import pathlib
import pickle
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.serialization import _get_layout


class UnsafeCheckpointError(ValueError):
    """A DCP file holds something a checkpoint never does (it may be tampered): nothing was run."""


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """What a DCP metadata pickle may name: DCP's own records and the harmless values in them.

    Calling any of these builds a record, a ``torch.Size`` or a path, or looks a layout up by
    name; none can reach a file, a process or an import.
    """
    records = [
        dcp_metadata.Metadata, dcp_metadata.MetadataIndex, dcp_metadata.StorageMeta,
        dcp_metadata.TensorStorageMetadata, dcp_metadata.BytesStorageMetadata,
        dcp_metadata.ChunkStorageMetadata, dcp_metadata.TensorProperties,
        dcp_metadata._MEM_FORMAT_ENCODING, _StorageInfo, torch.Size, _get_layout,
    ]
    allowed = {(record.__module__, record.__qualname__): record for record in records}
    # A checkpoint id saved as a Path; "pathlib" too, where the classes live in pathlib._local.
    for path_class in (pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath):
        allowed[("pathlib", path_class.__name__)] = path_class
        allowed[(path_class.__module__, path_class.__name__)] = path_class
    for name, value in vars(torch).items():  # every dtype pickles as torch.<name>
        if isinstance(value, torch.dtype):
            allowed[("torch", name)] = value
    return allowed


ALLOWED_GLOBALS = _allowed_globals()


class _MetadataUnpickler(pickle.Unpickler):
    """Finds only :data:`ALLOWED_GLOBALS`; the refusal names the file and the global."""

    def __init__(self, stream, path: str | os.PathLike) -> None:
        super().__init__(stream)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to load DCP metadata {self.path}: it names {module}.{name}, which a "
                "torch.distributed.checkpoint metadata file never holds (the file may be tampered)"
            ) from None


class SafeFileSystemReader(dcp.FileSystemReader):
    """``FileSystemReader`` whose metadata is unpickled with :class:`_MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        # The same files torch reads: the global ".metadata", or a rank's "__<rank>.metadata".
        rank = kwargs.get("rank")
        path = self.fs.concat_path(self.path, ".metadata" if rank is None else f"__{rank}.metadata")
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _MetadataUnpickler(stream, path).load()
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise UnsafeCheckpointError(
                f"refusing to load DCP metadata {path}: it holds a {type(metadata).__name__}, not a Metadata"
            )
        for info in (metadata.storage_data or {}).values():  # data files: plain names inside the folder
            relative = getattr(info, "relative_path", "")
            if not isinstance(relative, str) or os.path.basename(relative) != relative or relative in ("", ".", ".."):
                raise UnsafeCheckpointError(
                    f"refusing to load DCP metadata {path}: it points a data file at {relative!r}, outside "
                    "the checkpoint folder (the file may be tampered)"
                )
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(dcp.DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that unpickles non-tensor entries with ``weights_only=True``.

    ``checkpoint`` only names the folder in a refusal.
    """

    def __init__(self, *args: Any, checkpoint: str | os.PathLike | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.checkpoint = checkpoint

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        name = read_item.dest_index.fqn
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as error:
            lines = str(error).splitlines()
            reason = next((line.strip() for line in lines if "WeightsUnpickler error" in line), lines[0] if lines else "")
            reason = reason.split(" Please use")[0]  # not torch's advice to allowlist the global
            raise UnsafeCheckpointError(
                f"refusing to load entry {name!r} of DCP checkpoint {self.checkpoint}: torch's weights-only "
                f"unpickler refused it ({reason}); a checkpoint holds only tensors and plain values there "
                "(the file may be tampered)"
            ) from None
        # Where DefaultLoadPlanner.load_bytes puts the value.
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[name], loaded)
        else:
            self.state_dict[name] = loaded


def load(state_dict: dict, folder: str | os.PathLike, *, no_dist: bool = False) -> None:
    """``dcp.load(state_dict)`` from ``folder`` with the safe reader and planner.

    The metadata is read once up front, outside DCP's collectives, so a refusal reaches every
    process as itself; a refusal inside DCP's reads arrives wrapped in a ``CheckpointException``
    on every process and is unwrapped here.
    """
    reader = SafeFileSystemReader(folder)
    reader.read_metadata()
    try:
        dcp.load(state_dict, storage_reader=reader, planner=SafeLoadPlanner(checkpoint=folder), no_dist=no_dist)
    except CheckpointException as error:
        for failure, _trace in error.failures.values():
            if isinstance(failure, UnsafeCheckpointError):
                raise failure from None
        raise


__all__ = ["ALLOWED_GLOBALS", "SafeFileSystemReader", "SafeLoadPlanner", "UnsafeCheckpointError", "load"]
