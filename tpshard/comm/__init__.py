"""Communication: the collectives a sharded forward needs, named once (collectives.py), and their
implementations: a sum over the ranks of one process (local.py), torch.distributed with gloo or
NCCL (process_group.py), and a wrapper that counts what the model asked for (counting.py)."""
