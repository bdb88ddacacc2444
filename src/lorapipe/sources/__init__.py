"""One adapter per data source type -> ShareGPT rows."""
