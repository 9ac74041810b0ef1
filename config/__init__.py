"""This folder ships inside xm2 as the package ``xm2._presets`` (pyproject.toml maps it), so an
installed xm2 reads these YAML files with importlib.resources; xm2/presets.py finds them. This
file makes the folder a regular package, which an editable install needs to find it."""
