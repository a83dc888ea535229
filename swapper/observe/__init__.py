"""The event bus and its observers: metrics, the log hub, the activity log.

Owns: the bus's observers and bounded buffers.
May import: core, planners, memory, config, wire.
"""
