"""The only part of the service that imports torch: the batch pipeline, few-shot references on the model, the
GPU image path, and the engine's start-up (caches, categories)."""
