"""The GPU worker: reads batches from the queue, runs the engine, answers; its health and metrics app."""
