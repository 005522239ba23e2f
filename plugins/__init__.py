"""First-party plugins of bagel-titan, installed as `bagel_titan_plugins`."""
