"""Simulation of the cluster a topology describes, beside the real MPI work: the simulated clock
(clock.py: how long each round would take on the modelled links and devices). Pure: no MPI, no
torch."""
