"""tpshard: split nanoGPT checkpoints into Megatron-style tensor-parallel shards, run them, prove nothing changed."""

__version__ = "0.1.0"
