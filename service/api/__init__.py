"""The HTTP API of FiLo Inspect (FastAPI): `create_app(settings, backend)` in app.py."""
