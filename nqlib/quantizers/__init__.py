"""Quantizers built on lattices: Voronoi (nested-lattice) codes."""
