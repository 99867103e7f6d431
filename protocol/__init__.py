"""kmsnet protocol core: pure, synchronous, I/O-free.

Nothing here opens a socket, starts a task or reads the clock: time (`now`) and,
where tests need it, key material are arguments. See PROTOCOL.md for the bytes.
"""
