"""The offline lab beside the service: datasets and synthetic data (`data/`), training (`training/`),
evaluation (`evaluation/`), benchmarks and the GPU check (`bench/`), stand-in weights (`standin`).

It builds on `models/` and `service/`; neither imports it back (tests/test_imports.py). The `filo` command
line offers its commands (train, eval, synth, calibrate, bench, standin).
"""
