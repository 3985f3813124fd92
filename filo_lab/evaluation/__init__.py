"""Evaluation: the metric library (`metrics`), the batched runner over a dataset (`runner`), reports (`report`),
and per-category thresholds from labelled images (`calibration`)."""
