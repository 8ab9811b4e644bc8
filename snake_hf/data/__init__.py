"""Private shards: partitioners over a `datasets.Dataset` (`shards.py`), every node's indices into one dataset
(`node_data.py`), and the plan's batches, each stage drawn from its node's shard (`sampler.py`)."""
