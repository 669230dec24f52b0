"""Data jobs exposed by ``cli.py`` beside the LightningCLI commands (plain functions)."""
