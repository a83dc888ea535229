"""The config file: keys, values, defaults and their checks; a leaf that loads and validates.
Each key is declared once, as a row of its level's table (``spec``); the planners trust what
this package checked.

Owns: nothing mutable: a Config is frozen once loaded.
May import: nothing of swapper's but itself.
"""
