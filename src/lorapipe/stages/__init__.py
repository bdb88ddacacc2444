"""One module per dvc.yaml stage; each exposes `run(params) -> dict` (the one-line summary's fields)."""
