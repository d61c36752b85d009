"""Fleet: many nodes share one model library through Redis and each other.

`client.Fleet` is what the fetch service talks to; `peer_server` serves a node's verified files;
`registry`, `lease` and `ratelimit` hold the Redis side. Needs the `fleet` extra (redis-py); nothing
here is imported unless a fleet is configured.
"""
