"""HTTP/1.1 on the wire: request and response heads parsed by llhttp, chunked bodies, and the
pool of keep-alive connections to the children.

Owns: each upstream connection and its parser.
May import: nothing of swapper's.
"""
