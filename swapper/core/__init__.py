"""The pure scheduler and its vocabulary: model states and their transitions, messages,
errors, swap phases.

Owns: model states, in-flight ids, swaps and the queue (inside a Scheduler).
May import: planners, memory, config. No aiohttp, no I/O.
"""
