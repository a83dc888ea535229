"""One model request from grant to release: the exchange (lease, track, upstream
connection), the relay of its answer, the body's model id, request shaping, the loading
stream.

Owns: each request's exchange.
May import: runtime, observe, core, planners, memory, config, wire.
"""
