"""Tests of the certificate authority (issuance, administrators, revocation, its service)."""
