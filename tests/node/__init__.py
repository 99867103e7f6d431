"""Tests of node/, the peer (keystore, link, KMS, events), mostly with a real relay on 127.0.0.1."""
