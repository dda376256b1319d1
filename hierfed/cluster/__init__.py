"""Starting jobs: under MPI on this machine (mpi.py), on hosts with a rank map (hosts.py), inside
Slurm (slurm.py), as a planned job (jobs.py); and the checks every job passes before it starts
(preflight.py). Pure Python: no MPI import, no torch."""
