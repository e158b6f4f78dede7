"""Integration scenarios against a real private Postfix, the same for every mode (see deploy.py)."""
