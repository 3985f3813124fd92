"""The Redis Streams protocol between API pods and workers: keys, jobs, replies, producer, consumer."""
