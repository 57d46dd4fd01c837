"""The backends: the protocol every store implements, its types, and the implementations."""
