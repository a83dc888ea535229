"""What fits where: the ledger of footprints and capacities, the footprint files, one
sampler of RAM and NVML, and the monitor the run loop owns.

Owns: the ledger's measurements (through the run loop), the NVML session.
May import: config.
"""
