"""Training FiLo's heads: the released two-phase recipe (`trainer`) and its losses (`losses`)."""
