"""How a run maps onto ranks: the Topology (every communicator), the backend groups built once from
it, and `parallelize`, which applies expert and data parallelism to a model. With exaforce.comm,
the only place that communicates; the model holds no collective."""
