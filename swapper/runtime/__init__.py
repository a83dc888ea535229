"""The run loop (the only owner of the scheduler and of every child) and what it drives:
child processes, services, health probes, the reaper, owner marks on processes.

Owns: the inbox, the scheduler instance, every child and its tasks.
May import: observe, core, planners, memory, config, wire.
"""
