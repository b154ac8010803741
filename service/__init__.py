"""HTTP service, settings and the `ditmem` command line."""
