"""Package discovery, the one thing pyproject.toml cannot say: `plugins/` is installed as
`bagel_titan_plugins` (setuptools' `packages.find` finds packages but cannot rename them), so the
list is computed here from the folders, never written by hand. Everything else is in
pyproject.toml."""

from setuptools import find_packages, setup

PLUGINS = "bagel_titan_plugins"

setup(
    packages=[
        *find_packages(include=["bagel_titan", "bagel_titan.*"]),
        PLUGINS,
        *(f"{PLUGINS}.{name}" for name in find_packages("plugins")),
    ],
)
