"""Checkpoint IO: lazy readers for every layout users hold, atomic streaming safetensors writers."""

from samerge.io.checkpoint import Checkpoint, aliases_of, open_checkpoint, tensor_info
from samerge.io.hashing import BackgroundHasher, sha256_file
from samerge.io.writer import SafetensorsSink, parse_size, save_safetensors

__all__ = [
    "BackgroundHasher",
    "Checkpoint",
    "SafetensorsSink",
    "aliases_of",
    "open_checkpoint",
    "parse_size",
    "save_safetensors",
    "sha256_file",
    "tensor_info",
]
