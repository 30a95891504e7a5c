"""Shared cluster state in Redis: every key lives in `deltazip.cluster.keys` (prefix `dz:`)."""
