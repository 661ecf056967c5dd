"""`tpshard verify`: proof that a shard set is its dense model, as facts and verdicts (dataclasses of
plain values in report.py; the CLI renders them, or prints them as JSON). run.py is the entry point.

Three parts, each with its own verdict:

    integrity       the manifest; every rank file's presence, size, sha256, safetensors header and
                    rank metadata; with a reference checkpoint, every tensor merged back bit for bit.
                    A damaged file is named, and so is the tensor holding the damage where it can be
                    found: against the reference's piece, or else against another rank's replica.
    numerics        dense vs sharded on the same tokens: the residual stream at every block boundary,
                    the logits (within atol + rtol * |dense|), KL, top-1/top-5 agreement, and greedy
                    decoding through the KV cache. Skipped when integrity fails.
    communication   reductions per forward and bytes per token, counted by the model's collectives,
                    against the theory: parallel.plan.sync_points.

Both models compute in the shard set's dtype: a bfloat16 set is compared with its dense model in
bfloat16 (the reference checkpoint cast to it), so the numbers show what tensor parallelism changes,
not what the cast to bfloat16 did. The sharded side comes from runtime.programs.sharded_traces,
which runs the same `trace` in one process (simulated) or in one process per rank (distributed).
"""
