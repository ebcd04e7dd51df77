"""Secure multiparty computation over F_p, p = 2^127 - 1, for statistics on shared tables.

Modules in dependency order, each readable without the next:

* :mod:`qstore.mpc.shamir`: Shamir sharing of field vectors, Lagrange recombination, consistency.
* :mod:`qstore.mpc.engine`: sans-IO rounds (Context, Exchange, the generator convention), the
  wire form of a round's vectors, and an in-memory driver for tests and benchmarks.
* :mod:`qstore.mpc.protocols`: opening, multiplication, joint randomness, random bits,
  comparison, equality, bit decomposition and order statistics, all vectorised.

Nothing here does I/O: a node's runtime moves the bytes of each :class:`~qstore.mpc.engine.Exchange`.
"""
