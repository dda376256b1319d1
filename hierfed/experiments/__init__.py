"""Experiments: sweeps over run configs and topologies (sweep.py) and their reports, tables and
plots (report.py). Each point is an ordinary `hierfed run`, started through hierfed.cluster."""
