"""One module per package: each returns a report Section for a model config."""
