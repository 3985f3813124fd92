"""Where a station's images come from: a hot folder (folder.py) or a GenICam / GigE Vision camera (genicam.py),
each behind `Source` (base.py)."""
