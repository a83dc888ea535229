"""The config file: keys, values, defaults and their checks; a leaf that loads and validates.

Owns: nothing mutable: a Config is frozen once loaded.
May import: nothing of swapper's but itself.
"""
