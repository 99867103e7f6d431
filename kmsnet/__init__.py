"""kmsnet composition root: the command line, the demo and the chat UI."""

__version__ = "0.1.0"
