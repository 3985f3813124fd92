"""FiLo Inspect: request handling, pipelines and processes around the tensor-only `models` package."""
