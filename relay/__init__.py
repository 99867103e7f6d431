"""kmsnet relay: an untrusted asyncio WebSocket router with store-and-forward."""
