"""Hydra config groups (YAML only); a package so that an installed servelab ships them."""
