"""The teacher data: config and in-process solve (solve), Parquet store (store), the content-addressed cache
generated on a Ray Data actor pool (cache)."""
