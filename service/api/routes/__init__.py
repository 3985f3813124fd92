"""The HTTP routes, one module per resource; each talks to the backend interface only."""
