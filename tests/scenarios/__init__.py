"""Tests of scenarios/, the attack lab."""
