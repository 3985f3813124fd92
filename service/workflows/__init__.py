"""Application workflows: what the service does, below the HTTP layer and above the backends.

Routes parse a request, call one function here, and shape its answer; `filo learn` calls the same functions
from the command line. A workflow talks to the backend interface (service/backends/base.py) and the records,
never to FastAPI: inspecting and handing the finished inspection to its sinks (inspection.py), a category's
stored extras (category_state.py), its threshold and the history of changes (thresholds.py), its normal
references and calibration (references.py), learning from reviewed records (learn.py), and the records
themselves (records.py).
"""
