"""kmsnet scenarios: the lab harness, the attacker toolkit and the scripted attacks."""
