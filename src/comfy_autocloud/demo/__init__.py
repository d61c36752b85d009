"""Offline demo: a local origin serving generated model files, then fetch -> store -> evict -> status."""
