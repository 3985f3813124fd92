"""`filo line`: the line connector. Images from cameras and hot folders to the FiLo Inspect service, verdicts to
the PLC, MQTT and folders, every part signalled before its deadline whatever fails, nothing lost.

A client of the service's HTTP API only: it imports nothing of `service`, `models` or `filo_lab`
(tests/test_imports.py keeps it so), and installs as the `line` extra (`pip install '.[line]'`).
"""
