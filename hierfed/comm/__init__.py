"""Transport between tiers: MPI channels over contiguous buffers (`channel`), compressed model
traffic (`links`), codecs (`codecs`, pure numpy) and the byte ledger (`ledger`).

Nothing is imported here, so the pure parts (codecs, ledger) load without initialising MPI.
"""
