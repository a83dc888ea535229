"""The process: the CLI, start-up and shutdown (lifecycle), the aiohttp app's assembly, config
reload and preload, the service manager's notifications.

Owns: the event loop's lifetime, the listening sockets, the reaper process.
May import: every other package.
"""
