"""Simulated QKD network: key-rate models, qiskit BB84, key pools, relay, ETSI GS QKD 014 KMEs."""
