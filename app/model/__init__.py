"""The interatomic potential: graphs, bases, blocks, the energy model, forces and stress."""
