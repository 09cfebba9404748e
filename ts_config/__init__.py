"""ts_config."""
