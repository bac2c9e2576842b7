"""``dynamicid import-release``: the research release's weight files -> a dynamicid checkpoint."""
