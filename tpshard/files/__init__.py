"""Files in and out: all-or-nothing writes (atomic.py), safetensors and the dtype table
(tensorfile.py), the dense checkpoint and its checks (checkpoint.py), nanoGPT's ckpt.pt (nanogpt.py),
Hugging Face GPT-2 (hf.py), the shard set and its manifest (shardset.py), and paths.py, the one place
that decides what a path given by the user is."""
