"""exaforce: MPI-first training of Mixture-of-Experts machine-learning interatomic potentials."""

__version__ = "0.1.0"
