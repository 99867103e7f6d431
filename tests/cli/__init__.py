"""Tests of kmsnet/, the command line, the chat and the demo."""
