"""Persistence: atomic files and directories, safetensors I/O, the checkpoint directory format."""
