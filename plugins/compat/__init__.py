"""Converters from other BAGEL trainers' configs to bagel-titan TOML."""
