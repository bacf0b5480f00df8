"""The core: freezing state behind named accessors and the BatchNorm policy (imports only torch)."""
