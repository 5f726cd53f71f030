"""Checkpoint IO: lazy readers for every layout users hold (and Hub model IDs), atomic streaming safetensors writers."""

from samerge.io.checkpoint import (ACCEPTED_INPUTS, Checkpoint, aliases_of, as_checkpoint, open_checkpoint, open_input,
                                   open_model, tensor_info)
from samerge.io.hub import HubSnapshot, parse_hub_id, resolve_model
from samerge.io.hashing import BackgroundHasher, sha256_file
from samerge.io.writer import SafetensorsSink, parse_size, save_safetensors

__all__ = [
    "ACCEPTED_INPUTS",
    "BackgroundHasher",
    "Checkpoint",
    "HubSnapshot",
    "SafetensorsSink",
    "aliases_of",
    "as_checkpoint",
    "open_checkpoint",
    "open_input",
    "open_model",
    "parse_hub_id",
    "parse_size",
    "resolve_model",
    "save_safetensors",
    "sha256_file",
    "tensor_info",
]
