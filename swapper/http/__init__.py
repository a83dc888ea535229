"""One model request from its body to its release: which model it is for (target, modelid), the
exchange (shaping, lease, track, upstream connection), aiohttp's side of it (serve), the relay
of its answer, request shaping, the loading stream, peers.

Owns: each request's exchange.
May import: runtime, observe, core, planners, memory, config, wire.
"""
