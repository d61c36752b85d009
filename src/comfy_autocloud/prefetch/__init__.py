"""Disk prefetch: fetch models onto the local disk before a loader asks for them.

`predictor` learns which model is loaded next (a context model over the current session), `plan`
says when fetching a guess pays for what it would evict, `popularity` plans the pinned and most-used
models, `prefetcher` runs both in the background (rate-limited, stepping aside for on-demand
downloads), and `evaluate` replays a trace to score all of it against the baselines.
"""
