"""The handshake with the PLC that drives the reject gate: the protocol-independent state machine
(handshake.py) over a transport behind `PlcIO` (base.py): OPC UA (opcua.py) or Modbus TCP (modbus.py)."""
