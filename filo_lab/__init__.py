"""Offline work beside the service: stand-in weights and the GPU check (more of the lab moves here with
the re-layout of issue 14). Nothing in `models/` or `service/` imports this package."""
