"""What test modules share: the test PKI and clock, the lab (nodes, relays), runners, fixtures of
external servers. Imported explicitly; pytest collects nothing here."""
