"""Where each part's report goes besides the PLC: an MQTT broker (mqtt.py) or sorted folders (folder.py), each
behind `Publisher` (base.py). Publishing never delays a PLC signal: every publisher queues and delivers from its
own thread."""
