"""Backdoor attacks on pre-trained encoders, used to make test teachers (BadEncoder)."""
