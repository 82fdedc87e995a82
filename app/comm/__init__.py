"""The communication backends (mpi4py, Horovod, torch.distributed) behind one Group interface: bucketed gradient reduction, the differentiable all-to-all, broadcast."""
