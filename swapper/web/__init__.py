"""What clients talk to: the front door (every connection starts there) and aiohttp's handlers
for inference, control (/running, /unload), observation (/logs, /api/events, /metrics),
/upstream, auth, CORS and the UI's files.

Owns: nothing shared; each handler owns its request.
May import: http, runtime, observe, core, planners, memory, config, wire.
"""
