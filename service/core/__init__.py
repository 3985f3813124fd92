"""What every layer of the service shares, with no torch and no FastAPI: the request and result types, image
decoding and heatmaps, the domain errors, security primitives, telemetry, micro-batching."""
