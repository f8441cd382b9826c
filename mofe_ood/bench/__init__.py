"""Benchmark scripts that print figures (speed, memory): `python -m mofe_ood.bench NAME`."""
