"""Driver side of the batch-inference runner: spec, CLI, sharding, actor pool, commit."""
