"""The durable state of categories: the catalog stores (Redis, files) and the prompt caches, normal references,
thresholds and LLM-drafted descriptions."""
