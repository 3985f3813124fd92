"""Benchmarks: the model alone (`model`), the service path's CPU costs (`stack`), the service under load
(`load`, with its client `load_client`), Grounding DINO's CPU-side costs against their plain paths
(`grounding_post`), and the GPU check that runs them on a lent GPU (`gpu_check`)."""
