"""Shared test helpers: small models and float64 references (models), a tiny Llama for the framework
integrations (llama), gloo worker processes (spawn). Importable as helpers.* because tests/ is on sys.path
(pyproject.toml: pythonpath)."""
